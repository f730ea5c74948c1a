//! An in-process backend for tests of the generic lifecycle logic, with fault injection.
