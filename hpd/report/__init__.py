"""What a run and a student report: the console (`console`), metric sinks (`reporters`),
curves (`plot`), evaluation (`evaluate`) and lm-eval (`harness`). Imports everything below
training; never `hpd.train`."""
