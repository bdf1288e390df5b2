"""Names the training attentions give their inputs and outputs, which the 'save_attention' remat
policy keeps."""

# Names for the 'save_attention' remat policy. The CPU flash form's inputs (in its layout) and
# its outputs, which are also its backward's residuals: kept, the forward runs once (the
# backward would otherwise re-run it for the log-sum-exp).
FLASH_INPUTS = ("flash_query", "flash_key", "flash_value")
FLASH_OUTPUTS = ("flash_output", "flash_lse")
# The fused kernel's (`jax.nn.dot_product_attention`) inputs and output: its residuals are its
# own, so it runs again in the backward pass, from the kept inputs.
FUSED_NAMES = ("query", "key", "value", "attention")
