"""The core: paths, the kind seam, the use specs and their costs, the validating tree algebra."""
