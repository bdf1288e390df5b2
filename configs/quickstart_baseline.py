"""The honest ablation of the quickstart: plain distillation.

One round of teacher rationales, no feedback and no self-reflection; the teacher budget is
larger (8 rationales per question: more requests' worth of rationales than the tailored run's
annotation plus feedback) and it trains for about as many optimizer steps as the tailored run
takes over all its rounds.
"""
import importlib.util
import os


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _quickstart()
  c.rounds = 1
  c.method.feedback = False
  c.method.self_reflection = False
  c.teacher.num_rationales = 8
  c.train.epochs = 6
  return c
