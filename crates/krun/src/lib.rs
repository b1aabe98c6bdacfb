//! Safe wrapper over libkrun (in progress).
