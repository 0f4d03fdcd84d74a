"""Fixtures that ship only for tests, benchmarks and the DDIM check: analytic scenes, the
photometric proof fit, and tiny priors built in memory. Generation never imports them.
"""
