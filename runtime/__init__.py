"""dynaflow.runtime: run intra-device schedules on unchanged models. Imports torch only."""
