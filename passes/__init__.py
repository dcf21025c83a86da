"""The transformations sparsec applies, one module per family.

Importing this package registers every built-in pass; ``sparsec passes`` lists them.

* :mod:`.patterns` -- the shared subgraph matchers and skip codes
* :mod:`.prune` -- the weight-pruning site loop shared by the pruning passes
* :mod:`.nm_prune` -- ``nm``: N:M semi-structured pruning
"""

from . import nm_prune  # noqa: F401
