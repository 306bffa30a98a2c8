//! Host state-machine tests.
