"""DVC stages: one small module per stage (read params, call covidcxr, write outputs)."""
