"""The performance model: a profile measured once on the target (profile.py, measured by
profiler.py) and a simulator that predicts any schedule's time from it (simulate.py). Imports torch only through the Bench it
profiles; the simulator itself runs no op."""
from .profile import Profile, optimism
from .profiler import load_or_measure, measure_profile, record_error, transfer_profile
from .simulate import Headroom, ModelError, Prediction, Simulator, model_error, spearman

__all__ = ["Headroom", "ModelError", "Prediction", "Profile", "Simulator", "load_or_measure", "measure_profile",
           "model_error", "optimism", "record_error", "spearman", "transfer_profile"]
