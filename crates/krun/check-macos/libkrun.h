/*
 * Check-only declarations of the libkrun calls openshell-krun makes, for `cargo xtask check-macos`:
 * krun-sys runs bindgen on <libkrun.h>, and on Linux there is no macOS libkrun to read it from
 * (Homebrew's bottle carries it, on a Mac). Each signature is libkrun's C ABI as its
 * include/libkrun.h declares it, the same from 1.16.0 (the first with
 * krun_add_serial_console_default) to 1.19.0 and, outside Windows, since; the declarations are
 * ours, and only the ones the crate calls (a unit test in crates/krun keeps the two in step),
 * so bindgen's output is what type-checks `crates/krun/src/lib.rs` against. No header is included:
 * there is no Apple libc here for bindgen to read, and a glibc header must not stand in for it, so
 * the fixed-width types come from the compiler's predefined macros (what <stdint.h> uses too).
 * Never linked: the Mac job builds and links against Homebrew's real header and dylib.
 */
#ifndef OPENSHELL_CHECK_LIBKRUN_H
#define OPENSHELL_CHECK_LIBKRUN_H

typedef __INT32_TYPE__ int32_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT8_TYPE__ uint8_t;

int32_t krun_set_log_level(uint32_t level);
int32_t krun_create_ctx(void);
int32_t krun_free_ctx(uint32_t ctx_id);
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);
int32_t krun_set_root(uint32_t ctx_id, const char *root_path);
int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path);
/* libkrun.h says `bool` (from <stdbool.h>, not included here): C's own _Bool, which bindgen maps to bool. */
int32_t krun_add_disk(uint32_t ctx_id, const char *c_block_id, const char *c_disk_path, _Bool read_only);
int32_t krun_add_net_unixgram(uint32_t ctx_id, const char *c_path, int fd, uint8_t *const c_mac,
                              uint32_t features, uint32_t flags);
int32_t krun_set_passt_fd(uint32_t ctx_id, int fd);
int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path);
int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[],
                      const char *const envp[]);
int32_t krun_set_kernel(uint32_t ctx_id, const char *kernel_path, uint32_t kernel_format,
                        const char *initramfs, const char *cmdline);
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);
int32_t krun_add_serial_console_default(uint32_t ctx_id, int input_fd, int output_fd);
int32_t krun_start_enter(uint32_t ctx_id);

#endif
