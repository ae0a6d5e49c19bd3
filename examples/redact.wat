;; redact.wat: an http-wasm guest that rewrites response bodies.
;;
;; At init it enables buffer_response, which (called at init) holds every
;; response of this guest until handle_response returns. handle_request lets
;; every request through; handle_response reads the whole response body,
;; replaces each "SECRET" with "******" (same length) and writes it back.
;; A response whose next handler failed (is_error=1) is left alone.
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "enable_features"
    (func $enable_features (param $features i32) (result i32)))
  (import "http_handler" "log"
    (func $log (param $level i32) (param $msg i32) (param $msg_len i32)))
  (import "http_handler" "read_body"
    (func $read_body (param $kind i32) (param $buf i32) (param $buf_limit i32) (result i64)))
  (import "http_handler" "write_body"
    (func $write_body (param $kind i32) (param $body i32) (param $body_len i32)))

  ;; One page to start with; $read_response_body grows it for larger bodies.
  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $FEATURE_BUFFER_RESPONSE i32 (i32.const 2))
  (global $BODY_RESPONSE i32 (i32.const 1))
  (global $LOG_WARN i32 (i32.const 1))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "SECRET")
  (global $SECRET i32 (i32.const 0))
  (global $SECRET_LEN i32 (i32.const 6))
  ;; The replacement byte, written $SECRET_LEN times.
  (global $MASK_BYTE i32 (i32.const 0x2a))  ;; '*'

  (data (i32.const 16) "redact: the host did not enable buffer_response")
  (global $NO_BUFFERING_MSG i32 (i32.const 16))
  (global $NO_BUFFERING_MSG_LEN i32 (i32.const 47))

  ;; The response body is collected here; the buffer runs to the end of memory.
  (global $BODY_BUF i32 (i32.const 1024))

  ;; Init: ask for buffer_response for every request of this guest. The result
  ;; is the whole enabled set; warn when our bit is missing from it.
  (func (export "_initialize")
    (if (i32.eqz (i32.and (call $enable_features (global.get $FEATURE_BUFFER_RESPONSE))
                          (global.get $FEATURE_BUFFER_RESPONSE)))
      (then (call $log (global.get $LOG_WARN)
                       (global.get $NO_BUFFERING_MSG) (global.get $NO_BUFFERING_MSG_LEN)))))

  ;; Bytes available at $BODY_BUF with the memory as it is now.
  (func $body_capacity (result i32)
    (i32.sub (i32.shl (memory.size) (i32.const 16)) (global.get $BODY_BUF)))

  ;; Reads the whole response body to $BODY_BUF; returns its length.
  ;; read_body continues where the last call stopped and returns eof_len:
  ;; eof in the high 32 bits, bytes read in the low 32 bits (to be kept even
  ;; when eof is 1). buf_limit must never be 0, so memory grows first when full.
  (func $read_response_body (result i32)
    (local $len i32)       ;; bytes collected so far
    (local $eof_len i64)
    (block $eof
      (loop $each_chunk
        ;; Buffer full: double the memory (at least one more page).
        (if (i32.eq (local.get $len) (call $body_capacity))
          (then
            (if (i32.eq (memory.grow (memory.size)) (i32.const -1))
              (then unreachable))))
        (local.set $eof_len
          (call $read_body (global.get $BODY_RESPONSE)
            (i32.add (global.get $BODY_BUF) (local.get $len))
            (i32.sub (call $body_capacity) (local.get $len))))
        (local.set $len (i32.add (local.get $len) (i32.wrap_i64 (local.get $eof_len))))
        (br_if $eof (i64.ne (i64.shr_u (local.get $eof_len) (i64.const 32)) (i64.const 0)))
        (br $each_chunk)))
    (local.get $len))

  ;; 1 if the $SECRET_LEN bytes at $at are "SECRET".
  (func $is_secret_at (param $at i32) (result i32)
    (local $i i32)
    (block $done
      (loop $each_byte
        (br_if $done (i32.ge_u (local.get $i) (global.get $SECRET_LEN)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $at) (local.get $i)))
                    (i32.load8_u (i32.add (global.get $SECRET) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each_byte)))
    (i32.const 1))

  ;; Overwrites, in place, every "SECRET" in the $len bytes at $buf with "******".
  (func $redact (param $buf i32) (param $len i32)
    (local $i i32)
    (block $done
      (loop $each_position
        ;; Stop when fewer than $SECRET_LEN bytes are left.
        (br_if $done (i32.gt_u (i32.add (local.get $i) (global.get $SECRET_LEN)) (local.get $len)))
        (if (call $is_secret_at (i32.add (local.get $buf) (local.get $i)))
          (then
            (memory.fill (i32.add (local.get $buf) (local.get $i))
                         (global.get $MASK_BYTE) (global.get $SECRET_LEN))
            (local.set $i (i32.add (local.get $i) (global.get $SECRET_LEN))))
          (else
            (local.set $i (i32.add (local.get $i) (i32.const 1)))))
        (br $each_position))))

  ;; Every request goes on to the next handler (next=1, req_ctx=0).
  (func (export "handle_request") (result i64)
    (i64.const 1))

  ;; After the next handler: the response is still held by the host.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (local $len i32)
    (if (local.get $is_error) (then (return)))
    (local.set $len (call $read_response_body))
    (call $redact (global.get $BODY_BUF) (local.get $len))
    ;; The first write_body of this phase replaces the whole response body.
    (call $write_body (global.get $BODY_RESPONSE) (global.get $BODY_BUF) (local.get $len)))
)
