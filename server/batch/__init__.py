"""Many (prompt, seed) jobs at once on a Ray cluster: `python -m server batch`. Needs the optional Ray
extra (`requirements-ray.txt`); nothing else in the server imports this package."""
