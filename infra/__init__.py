"""Service stacks for running lesa: a local one for one machine, compose for production."""
