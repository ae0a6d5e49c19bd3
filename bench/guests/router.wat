;; router: answers requests whose URI starts with "/guest" itself, passes the rest on.
;;   /guest...  -> set_status_code 200, content-type text/plain, body "hello from the guest\n", next=0
;;   otherwise  -> next=1 (the downstream resource answers)
;; Host calls: 1 (get_uri) for pass-through, 4 when the guest answers.
(module
  (import "http_handler" "get_uri"
    (func $get_uri (param i32 i32) (result i32)))
  (import "http_handler" "set_status_code"
    (func $set_status_code (param i32)))
  (import "http_handler" "set_header_value"
    (func $set_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "write_body"
    (func $write_body (param i32 i32 i32)))

  (memory (export "memory") 1)

  ;; constants live below 1024; the URI buffer is [1024, 65536)
  (data (i32.const 0) "/guest")                    ;; 6 bytes
  (data (i32.const 16) "content-type")             ;; 12 bytes
  (data (i32.const 32) "text/plain")               ;; 10 bytes
  (data (i32.const 48) "hello from the guest\n")   ;; 21 bytes

  (global $uri_buf i32 (i32.const 1024))
  (global $uri_limit i32 (i32.const 64512))

  ;; 1 when the URI (len bytes at $uri_buf) starts with "/guest"
  (func $is_guest (param $len i32) (result i32)
    (local $i i32)
    (if (i32.lt_u (local.get $len) (i32.const 6))
      (then (return (i32.const 0))))
    (block $done
      (loop $cmp
        (br_if $done (i32.ge_u (local.get $i) (i32.const 6)))
        (if (i32.ne
              (i32.load8_u (i32.add (global.get $uri_buf) (local.get $i)))
              (i32.load8_u (local.get $i)))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $cmp)))
    (i32.const 1))

  (func (export "handle_request") (result i64)
    (local $len i32)
    (local.set $len (call $get_uri (global.get $uri_buf) (global.get $uri_limit)))
    ;; a URI longer than the buffer was not written: treat it as "not ours"
    (if (i32.gt_u (local.get $len) (global.get $uri_limit))
      (then (return (i64.const 1))))
    (if (call $is_guest (local.get $len))
      (then
        (call $set_status_code (i32.const 200))
        (call $set_header_value (i32.const 1)      ;; response headers
          (i32.const 16) (i32.const 12)            ;; content-type
          (i32.const 32) (i32.const 10))           ;; text/plain
        (call $write_body (i32.const 1) (i32.const 48) (i32.const 21))
        (return (i64.const 0))))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
