"""One generation job: its settings (`spec`), its exceptions (`errors`) and what it reports (`events`).

stdlib + numpy, relative imports: the extension reads `spec`'s job format and precisions.
"""
