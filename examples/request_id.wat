;; request_id.wat: an http-wasm guest that tags each request with an id.
;;
;; handle_request counts requests (one counter per guest instance, so ids
;; repeat across the instances of the host's pool), formats the id as
;; "req-<n>" in decimal, sets it as the request header x-request-id (the next
;; handler sees it) and as the response header x-request-id (set in
;; handle_request, so part of the final response), and returns next=1 with
;; req_ctx=<n>. handle_response gets <n> back and logs "req-<n> status=<code>"
;; at info level, or "req-<n> failed" at warn level when the next handler failed.
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "set_header_value"
    (func $set_header_value (param $kind i32) (param $name i32) (param $name_len i32)
                            (param $value i32) (param $value_len i32)))
  (import "http_handler" "get_status_code"
    (func $get_status_code (result i32)))
  (import "http_handler" "log"
    (func $log (param $level i32) (param $msg i32) (param $msg_len i32)))
  (import "http_handler" "log_enabled"
    (func $log_enabled (param $level i32) (result i32)))

  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $HEADER_REQUEST i32 (i32.const 0))
  (global $HEADER_RESPONSE i32 (i32.const 1))
  (global $LOG_INFO i32 (i32.const 0))
  (global $LOG_WARN i32 (i32.const 1))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "x-request-id")
  (global $X_REQUEST_ID i32 (i32.const 0))
  (global $X_REQUEST_ID_LEN i32 (i32.const 12))

  (data (i32.const 16) "req-")
  (global $ID_PREFIX i32 (i32.const 16))
  (global $ID_PREFIX_LEN i32 (i32.const 4))

  (data (i32.const 32) " status=")
  (global $STATUS_LABEL i32 (i32.const 32))
  (global $STATUS_LABEL_LEN i32 (i32.const 8))

  (data (i32.const 48) " failed")
  (global $FAILED i32 (i32.const 48))
  (global $FAILED_LEN i32 (i32.const 7))

  ;; --- buffers -----------------------------------------------------------------
  ;; "req-" + up to 10 digits.
  (global $ID_BUF i32 (i32.const 64))
  ;; The log message: id + " status=" + up to 10 digits.
  (global $MSG_BUF i32 (i32.const 128))

  ;; --- state -------------------------------------------------------------------
  (global $counter (mut i32) (i32.const 0))

  ;; Writes $n (unsigned) in decimal at $dst; returns the number of digits.
  (func $format_decimal (param $dst i32) (param $n i32) (result i32)
    (local $digits i32)
    (local $rest i32)
    (local $pos i32)
    ;; Count the digits (at least one, for 0).
    (local.set $digits (i32.const 1))
    (local.set $rest (i32.div_u (local.get $n) (i32.const 10)))
    (block $counted
      (loop $each_digit
        (br_if $counted (i32.eqz (local.get $rest)))
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
        (br $each_digit)))
    ;; Write them from the last one backwards.
    (local.set $pos (i32.add (local.get $dst) (local.get $digits)))
    (local.set $rest (local.get $n))
    (loop $write_digit
      (local.set $pos (i32.sub (local.get $pos) (i32.const 1)))
      (i32.store8 (local.get $pos)
        (i32.add (i32.const 0x30) (i32.rem_u (local.get $rest) (i32.const 10))))  ;; '0' + d
      (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
      (br_if $write_digit (i32.gt_u (local.get $pos) (local.get $dst))))
    (local.get $digits))

  ;; Writes "req-<n>" at $dst; returns its length.
  (func $format_id (param $dst i32) (param $n i32) (result i32)
    (memory.copy (local.get $dst) (global.get $ID_PREFIX) (global.get $ID_PREFIX_LEN))
    (i32.add (global.get $ID_PREFIX_LEN)
      (call $format_decimal (i32.add (local.get $dst) (global.get $ID_PREFIX_LEN))
                            (local.get $n))))

  ;; Called once per request. Result: ctx_next = req_ctx << 32 | next.
  (func (export "handle_request") (result i64)
    (local $id_len i32)
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (local.set $id_len (call $format_id (global.get $ID_BUF) (global.get $counter)))
    ;; For the next handler...
    (call $set_header_value (global.get $HEADER_REQUEST)
      (global.get $X_REQUEST_ID) (global.get $X_REQUEST_ID_LEN)
      (global.get $ID_BUF) (local.get $id_len))
    ;; ...and for the client.
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $X_REQUEST_ID) (global.get $X_REQUEST_ID_LEN)
      (global.get $ID_BUF) (local.get $id_len))
    ;; next=1, req_ctx=counter.
    (i64.or (i64.shl (i64.extend_i32_u (global.get $counter)) (i64.const 32))
            (i64.const 1)))

  ;; After the next handler; $req_ctx is the counter value of this request.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (local $len i32)
    (if (local.get $is_error)
      (then
        ;; "req-<n> failed" at warn level.
        (local.set $len (call $format_id (global.get $MSG_BUF) (local.get $req_ctx)))
        (memory.copy (i32.add (global.get $MSG_BUF) (local.get $len))
                     (global.get $FAILED) (global.get $FAILED_LEN))
        (local.set $len (i32.add (local.get $len) (global.get $FAILED_LEN)))
        (call $log (global.get $LOG_WARN) (global.get $MSG_BUF) (local.get $len))
        (return)))
    ;; Skip the formatting when info is not logged.
    (if (i32.eqz (call $log_enabled (global.get $LOG_INFO)))
      (then (return)))
    ;; "req-<n> status=<code>" at info level.
    (local.set $len (call $format_id (global.get $MSG_BUF) (local.get $req_ctx)))
    (memory.copy (i32.add (global.get $MSG_BUF) (local.get $len))
                 (global.get $STATUS_LABEL) (global.get $STATUS_LABEL_LEN))
    (local.set $len (i32.add (local.get $len) (global.get $STATUS_LABEL_LEN)))
    (local.set $len
      (i32.add (local.get $len)
        (call $format_decimal (i32.add (global.get $MSG_BUF) (local.get $len))
                              (call $get_status_code))))
    (call $log (global.get $LOG_INFO) (global.get $MSG_BUF) (local.get $len)))
)
