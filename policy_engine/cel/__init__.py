"""CEL behind one interface: parsing, checking, analysis of the tree and evaluation.

The compiler asks this package for programs and for facts about an expression (the names
it reads, the event names it filters on); nothing above it knows which CEL engine runs.
"""
