;; router.wat: an http-wasm guest that routes on the URI path.
;;
;;   /host...   the guest answers by itself: 200, content-type: text/plain,
;;              body "hello from the guest\n"; the next handler does not run.
;;   /api/...   the "/api" prefix is stripped ("/api/items?x=1" -> "/items?x=1")
;;              with set_uri, then the next handler runs on the new URI.
;;   otherwise  the next handler runs with the request unchanged.
;;
;; "/host" is a plain prefix test on the raw URI, so "/hosts" and "/host?x" match too.
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "get_uri"
    (func $get_uri (param $buf i32) (param $buf_limit i32) (result i32)))
  (import "http_handler" "set_uri"
    (func $set_uri (param $uri i32) (param $uri_len i32)))
  (import "http_handler" "set_status_code"
    (func $set_status_code (param $code i32)))
  (import "http_handler" "set_header_value"
    (func $set_header_value (param $kind i32) (param $name i32) (param $name_len i32)
                            (param $value i32) (param $value_len i32)))
  (import "http_handler" "write_body"
    (func $write_body (param $kind i32) (param $body i32) (param $body_len i32)))

  ;; One page to start with; $read_uri grows it if a URI does not fit.
  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $HEADER_RESPONSE i32 (i32.const 1))
  (global $BODY_RESPONSE i32 (i32.const 1))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "/host")
  (global $HOST_PREFIX i32 (i32.const 0))
  (global $HOST_PREFIX_LEN i32 (i32.const 5))

  (data (i32.const 16) "/api/")
  (global $API_PREFIX i32 (i32.const 16))
  (global $API_PREFIX_LEN i32 (i32.const 5))
  ;; What is stripped from an /api/ URI: "/api" (the following "/" stays).
  (global $API_STRIP_LEN i32 (i32.const 4))

  (data (i32.const 32) "content-type")
  (global $CONTENT_TYPE i32 (i32.const 32))
  (global $CONTENT_TYPE_LEN i32 (i32.const 12))

  (data (i32.const 48) "text/plain")
  (global $TEXT_PLAIN i32 (i32.const 48))
  (global $TEXT_PLAIN_LEN i32 (i32.const 10))

  (data (i32.const 64) "hello from the guest\n")
  (global $HELLO i32 (i32.const 64))
  (global $HELLO_LEN i32 (i32.const 21))

  ;; The URI is read here; the buffer runs to the end of memory.
  (global $URI_BUF i32 (i32.const 1024))

  ;; Bytes available for the URI at $URI_BUF with the memory as it is now.
  (func $uri_capacity (result i32)
    (i32.sub (i32.shl (memory.size) (i32.const 16)) (global.get $URI_BUF)))

  ;; Reads the request URI to $URI_BUF and returns its length.
  ;; buf/buf_limit rule: the host writes nothing when the URI is longer than
  ;; the limit but still returns its length; then grow memory and ask again.
  (func $read_uri (result i32)
    (local $len i32)
    (local.set $len (call $get_uri (global.get $URI_BUF) (call $uri_capacity)))
    (if (i32.gt_u (local.get $len) (call $uri_capacity))
      (then
        ;; Grow by enough 64 KiB pages for the missing bytes (rounded up).
        (if (i32.eq
              (memory.grow
                (i32.add
                  (i32.shr_u (i32.sub (local.get $len) (call $uri_capacity)) (i32.const 16))
                  (i32.const 1)))
              (i32.const -1))
          (then unreachable))
        (local.set $len (call $get_uri (global.get $URI_BUF) (call $uri_capacity)))
        ;; Still too long: the host changed its answer; give up on this request.
        (if (i32.gt_u (local.get $len) (call $uri_capacity))
          (then unreachable))))
    (local.get $len))

  ;; 1 if the $len bytes at $str start with the $prefix_len bytes at $prefix.
  (func $starts_with (param $str i32) (param $len i32)
                     (param $prefix i32) (param $prefix_len i32) (result i32)
    (local $i i32)
    (if (i32.lt_u (local.get $len) (local.get $prefix_len))
      (then (return (i32.const 0))))
    (block $done
      (loop $each_byte
        (br_if $done (i32.ge_u (local.get $i) (local.get $prefix_len)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $str) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $prefix) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each_byte)))
    (i32.const 1))

  ;; Called once per request. Result: ctx_next (next in the low 32 bits).
  (func (export "handle_request") (result i64)
    (local $uri_len i32)
    (local.set $uri_len (call $read_uri))

    ;; /host...: build the whole response here and stop (next=0).
    (if (call $starts_with (global.get $URI_BUF) (local.get $uri_len)
                           (global.get $HOST_PREFIX) (global.get $HOST_PREFIX_LEN))
      (then
        (call $set_status_code (i32.const 200))
        (call $set_header_value (global.get $HEADER_RESPONSE)
          (global.get $CONTENT_TYPE) (global.get $CONTENT_TYPE_LEN)
          (global.get $TEXT_PLAIN) (global.get $TEXT_PLAIN_LEN))
        (call $write_body (global.get $BODY_RESPONSE)
          (global.get $HELLO) (global.get $HELLO_LEN))
        (return (i64.const 0))))

    ;; /api/...: the new URI is the old one minus its first 4 bytes ("/api").
    (if (call $starts_with (global.get $URI_BUF) (local.get $uri_len)
                           (global.get $API_PREFIX) (global.get $API_PREFIX_LEN))
      (then
        (call $set_uri
          (i32.add (global.get $URI_BUF) (global.get $API_STRIP_LEN))
          (i32.sub (local.get $uri_len) (global.get $API_STRIP_LEN)))))

    ;; Everything else (and the rewritten /api/ request): next=1, req_ctx=0.
    (i64.const 1))

  ;; Nothing to do after the next handler.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32))
)
