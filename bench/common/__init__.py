"""What the benchmark suites share: child processes, test images, curl and wrk clients, the
imgcache server under test, nginx (the fast Glance stand-in and the static baseline),
installs of missing programs, a run's lifecycle, correctness checks and report pieces."""
