"""Verification commands: checks that sit above the library layers and prove a layout, a conversion or a sync before a long run."""
