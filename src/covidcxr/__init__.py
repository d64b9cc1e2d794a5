"""covidcxr: reproduce, audit and serve the chest X-ray COVID-19 detector of Arias-Garzón et al. 2021."""

__version__ = "0.1.0"
