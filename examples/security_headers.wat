;; security_headers.wat: an http-wasm guest that adds security headers.
;;
;; handle_request sets three response headers and lets the request through
;; (next=1). Response headers set in handle_request are part of the final
;; response, whatever the next handler does.
;;   x-content-type-options: nosniff
;;   x-frame-options: DENY
;;   referrer-policy: no-referrer
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "set_header_value"
    (func $set_header_value (param $kind i32) (param $name i32) (param $name_len i32)
                            (param $value i32) (param $value_len i32)))

  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $HEADER_RESPONSE i32 (i32.const 1))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "x-content-type-options")
  (global $NOSNIFF_NAME i32 (i32.const 0))
  (global $NOSNIFF_NAME_LEN i32 (i32.const 22))
  (data (i32.const 32) "nosniff")
  (global $NOSNIFF_VALUE i32 (i32.const 32))
  (global $NOSNIFF_VALUE_LEN i32 (i32.const 7))

  (data (i32.const 48) "x-frame-options")
  (global $FRAME_NAME i32 (i32.const 48))
  (global $FRAME_NAME_LEN i32 (i32.const 15))
  (data (i32.const 64) "DENY")
  (global $FRAME_VALUE i32 (i32.const 64))
  (global $FRAME_VALUE_LEN i32 (i32.const 4))

  (data (i32.const 80) "referrer-policy")
  (global $REFERRER_NAME i32 (i32.const 80))
  (global $REFERRER_NAME_LEN i32 (i32.const 15))
  (data (i32.const 96) "no-referrer")
  (global $REFERRER_VALUE i32 (i32.const 96))
  (global $REFERRER_VALUE_LEN i32 (i32.const 11))

  ;; Called once per request: set the headers, next=1, req_ctx=0.
  (func (export "handle_request") (result i64)
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $NOSNIFF_NAME) (global.get $NOSNIFF_NAME_LEN)
      (global.get $NOSNIFF_VALUE) (global.get $NOSNIFF_VALUE_LEN))
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $FRAME_NAME) (global.get $FRAME_NAME_LEN)
      (global.get $FRAME_VALUE) (global.get $FRAME_VALUE_LEN))
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $REFERRER_NAME) (global.get $REFERRER_NAME_LEN)
      (global.get $REFERRER_VALUE) (global.get $REFERRER_VALUE_LEN))
    (i64.const 1))

  ;; Nothing to do after the next handler.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32))
)
