"""``megacov verify <what>``: checks a user runs on their own model and layout before a long run.

They sit above the library layers (models, parallel, rollout, runtime) and may use all of them;
nothing in those layers imports this package.
"""
