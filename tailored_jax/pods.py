"""`python -m tailored_jax.pods`: the paper's students on real TPU slices, each compiled by the
TPU compiler (`plan --topology`, one process per slice; no TPU needed) with
train.microbatches=0 (the planner slices the paper's batch until it fits); prints the README's
"Pods" table and writes every plan's JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (config, preset) of the paper's students; the slices of the README table
STUDENTS = {
    "gptj_6b": "configs/gsm8k_gptj6b.py",
    "llama3_8b": "configs/gsm8k_llama3_8b.py",
}
SLICES = {
    "v4-8": "v4:2x2x1",
    "v4-32": "v4:2x2x4",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v5p-8": "v5p:2x2x1",
    "v6e-8": "v6e:2x4",
}


def plan_one(config: str, preset: str, topology: str, extra: list[str]) -> dict:
  """One slice's plan (the JSON `plan` prints), or {'error': its last line}."""
  done = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.plan",
          f"--config={config}",
          f"--model={preset}",
          f"--topology={topology}",
          "--config.train.microbatches=0",
          *extra,
      ],
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  start = done.stdout.find("{")
  if start < 0:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"error": lines[-1] if lines else f"exit {done.returncode}"}
  return json.loads(done.stdout[start:])


def row(student: str, slice_name: str, report: dict) -> str:
  if "error" in report:
    return f"| {student} | {slice_name} | error: {report['error']} | | | | | |"
  step = report["train_step"]
  hbm = step["device_memory_gb"]
  if "compiler_error" in step:
    tried = ",".join(map(str, step.get("microbatches_tried", [])))
    return (
        f"| {student} | {slice_name} | no | > {hbm:.1f} (compiler: out of HBM) | tried {tried} |"
        f" {step['largest_batch_that_fits']} (planner) | | |"
    )
  xla = step["xla_bytes_per_device"]
  gathers = step["collectives"].get("all-gather", {})
  reduces = step["collectives"].get("all-reduce", {})
  return (
      f"| {student} | {slice_name} | {'yes' if step['fits'] else 'no'} |"
      f" {xla['total'] / 1e9:.2f} / {hbm:.1f} | {step['microbatches']} |"
      f" {step['largest_batch_that_fits']} |"
      f" {gathers.get('count', 0)} AG {gathers.get('bytes', 0) / 1e9:.1f} GB,"
      f" {reduces.get('count', 0)} AR {reduces.get('bytes', 0) / 1e9:.1f} GB |"
      f" {step['roofline']['estimated_step_seconds']:.2f} |"
  )


HEADER = (
    "| student | slice | fits | GB per chip (compiled / HBM) | microbatches | largest batch |"
    " collectives per step | step s (estimate) |\n|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--students", default=",".join(STUDENTS))
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--out", default="pods", help="folder for each plan's JSON")
  args, extra = parser.parse_known_args(argv)
  os.makedirs(args.out, exist_ok=True)
  lines = [HEADER]
  for student in args.students.split(","):
    for slice_name in args.slices.split(","):
      report = plan_one(STUDENTS[student], student, SLICES[slice_name], extra)
      with open(os.path.join(args.out, f"{student}_{slice_name}.json"), "w") as f:
        json.dump(report, f, indent=2)
      lines.append(row(student, slice_name, report))
      print(lines[-1], file=sys.stderr, flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
