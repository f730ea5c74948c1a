//! Sandbox tools (in progress).
