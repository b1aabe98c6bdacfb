pub mod host_processes;
