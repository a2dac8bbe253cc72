"""Running a model whose weights stay on flash storage: page reads planned by a measured cost model."""
