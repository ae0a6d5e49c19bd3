//! router.rs: the same as ../router.wat, in Rust with no crates.
//!
//! - a URI starting with `/host` is answered by the guest itself: 200,
//!   `content-type: text/plain`, body `hello from the guest\n`;
//! - a URI starting with `/api/` loses its `/api` prefix and goes on;
//! - anything else goes on unchanged.
//!
//! Build (Debian: `apt-get install rustc libstd-rust-dev-wasm32`):
//!
//!     python3 examples/rust/build.py examples/rust/router.rs -o /tmp/router.wasm
//!
//! which runs `rustc --target wasm32-unknown-unknown --crate-type cdylib -O ...`.

// The host functions: module "http_handler". Every parameter is an i32 (u32 here),
// results are i32 or i64 (u64 here), as the http-wasm ABI defines them.
#[link(wasm_import_module = "http_handler")]
extern "C" {
    fn get_uri(buf: *mut u8, buf_limit: u32) -> u32;
    fn set_uri(uri: *const u8, uri_len: u32);
    fn set_status_code(code: u32);
    fn set_header_value(kind: u32, name: *const u8, name_len: u32, value: *const u8, value_len: u32);
    fn write_body(kind: u32, body: *const u8, body_len: u32);
}

const HEADER_RESPONSE: u32 = 1;
const BODY_RESPONSE: u32 = 1;

/// The request URI. The host writes it only if it fits, and returns its length
/// either way: a longer URI is read again into a buffer of that length.
fn uri() -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let len = unsafe { get_uri(buf.as_mut_ptr(), buf.len() as u32) } as usize;
    if len > buf.len() {
        buf.resize(len, 0);
        unsafe { get_uri(buf.as_mut_ptr(), len as u32) };
    }
    buf.truncate(len);
    buf
}

fn set_response_header(name: &[u8], value: &[u8]) {
    unsafe { set_header_value(HEADER_RESPONSE, name.as_ptr(), name.len() as u32, value.as_ptr(), value.len() as u32) }
}

/// Returns `req_ctx << 32 | next`: 1 passes the request on, 0 means the guest answered.
#[no_mangle]
pub extern "C" fn handle_request() -> u64 {
    let uri = uri();
    if uri.starts_with(b"/host") {
        let body = b"hello from the guest\n";
        unsafe { set_status_code(200) };
        set_response_header(b"content-type", b"text/plain");
        unsafe { write_body(BODY_RESPONSE, body.as_ptr(), body.len() as u32) };
        return 0;
    }
    if uri.starts_with(b"/api/") {
        let rest = &uri[4..];
        unsafe { set_uri(rest.as_ptr(), rest.len() as u32) };
    }
    1
}

#[no_mangle]
pub extern "C" fn handle_response(_req_ctx: u32, _is_error: u32) {}
