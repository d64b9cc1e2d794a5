"""covidcxr: reproduce, audit and serve the chest X-ray COVID-19 detector of Arias-Garzón et al. 2021."""

from covidcxr import runtime as _runtime

__version__ = "0.1.0"

_runtime.apply_defaults()  # telemetry off, TensorFlow's C++ notices quiet (covidcxr.runtime)
