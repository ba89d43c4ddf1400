"""Test-wide setup, before JAX is imported anywhere: eight virtual CPU devices, and XLA's LLVM backend at
optimisation level 0. The suite is dominated by compiling small models; level 0 compiles them about 1.5x
faster and leaves the arithmetic as it is (XLA's HLO passes and buffer assignment do not depend on it)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
