"""The shape being optimised: tetrahedral grid, DMTet, SDF queries, regularisers, colour field."""
