;; headers: sets two response headers and reads one request header, then next=1.
;; Host calls per request: 3 (set_header_value x2, get_header_values x1).
;; Setting response headers in handle_request with next=1 is legal: they are part of
;; the final response, with the downstream's headers added to them.
(module
  (import "http_handler" "set_header_value"
    (func $set_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "get_header_values"
    (func $get_header_values (param i32 i32 i32 i32 i32) (result i64)))

  (memory (export "memory") 1)

  (data (i32.const 0) "x-bench-guest")   ;; 13 bytes
  (data (i32.const 16) "headers")        ;; 7 bytes
  (data (i32.const 32) "x-bench-seen")   ;; 12 bytes
  (data (i32.const 48) "yes")            ;; 3 bytes
  (data (i32.const 64) "user-agent")     ;; 10 bytes

  ;; header values are read into [1024, 65536)
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 1)
      (i32.const 0) (i32.const 13) (i32.const 16) (i32.const 7))
    (call $set_header_value (i32.const 1)
      (i32.const 32) (i32.const 12) (i32.const 48) (i32.const 3))
    (drop (call $get_header_values (i32.const 0)
      (i32.const 64) (i32.const 10) (i32.const 1024) (i32.const 64512)))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
