"""The maths of CTM as pure functions and small modules: EDM preconditioning and the CTM jump, noise schedules,
PF-ODE solvers, samplers, losses, likelihood, and the exact Gaussian-mixture denoisers. No I/O; imports nothing
of ctmkit but errors (docs/architecture.md)."""
