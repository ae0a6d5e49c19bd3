;; auth.wat: an http-wasm guest doing HTTP Basic authentication.
;;
;; The guest config (get_config) is the expected credential in plain text,
;; "user:password". At init the guest base64-encodes it once; each request's
;; "Authorization: Basic <token>" header must then carry exactly that token.
;;
;;   match      next=1: the next handler runs.
;;   otherwise  401, www-authenticate: Basic realm="httpwasm",
;;              content-type: text/plain, body "unauthorized\n"; next=0.
;;
;; The scheme name "Basic" is matched case-insensitively (RFC 7617), the token
;; exactly. A request with no Authorization header, or with more than one, is
;; refused. An empty or over-long (> 1024 bytes) config is an error: it is
;; logged and the guest traps, so the host fails the request (fail closed).
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "get_config"
    (func $get_config (param $buf i32) (param $buf_limit i32) (result i32)))
  (import "http_handler" "log"
    (func $log (param $level i32) (param $msg i32) (param $msg_len i32)))
  (import "http_handler" "get_header_values"
    (func $get_header_values (param $kind i32) (param $name i32) (param $name_len i32)
                             (param $buf i32) (param $buf_limit i32) (result i64)))
  (import "http_handler" "set_header_value"
    (func $set_header_value (param $kind i32) (param $name i32) (param $name_len i32)
                            (param $value i32) (param $value_len i32)))
  (import "http_handler" "write_body"
    (func $write_body (param $kind i32) (param $body i32) (param $body_len i32)))
  (import "http_handler" "set_status_code"
    (func $set_status_code (param $code i32)))

  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $HEADER_REQUEST i32 (i32.const 0))
  (global $HEADER_RESPONSE i32 (i32.const 1))
  (global $BODY_RESPONSE i32 (i32.const 1))
  (global $LOG_ERROR i32 (i32.const 2))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "authorization")
  (global $AUTHORIZATION i32 (i32.const 0))
  (global $AUTHORIZATION_LEN i32 (i32.const 13))

  (data (i32.const 16) "www-authenticate")
  (global $WWW_AUTHENTICATE i32 (i32.const 16))
  (global $WWW_AUTHENTICATE_LEN i32 (i32.const 16))

  (data (i32.const 32) "Basic realm=\"httpwasm\"")
  (global $CHALLENGE i32 (i32.const 32))
  (global $CHALLENGE_LEN i32 (i32.const 22))

  (data (i32.const 64) "unauthorized\n")
  (global $UNAUTHORIZED i32 (i32.const 64))
  (global $UNAUTHORIZED_LEN i32 (i32.const 13))

  (data (i32.const 80) "content-type")
  (global $CONTENT_TYPE i32 (i32.const 80))
  (global $CONTENT_TYPE_LEN i32 (i32.const 12))

  (data (i32.const 96) "text/plain")
  (global $TEXT_PLAIN i32 (i32.const 96))
  (global $TEXT_PLAIN_LEN i32 (i32.const 10))

  ;; The scheme, lowercase; compared case-insensitively.
  (data (i32.const 112) "basic")
  (global $BASIC i32 (i32.const 112))
  (global $BASIC_LEN i32 (i32.const 5))

  ;; The base64 alphabet (RFC 4648), indexed by 6-bit value.
  (data (i32.const 128) "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
  (global $B64_ALPHABET i32 (i32.const 128))

  (data (i32.const 256) "auth: the guest config must be user:password, 1 to 1024 bytes")
  (global $BAD_CONFIG_MSG i32 (i32.const 256))
  (global $BAD_CONFIG_MSG_LEN i32 (i32.const 61))

  ;; --- buffers -----------------------------------------------------------------
  ;; The config, as read (up to 1024 bytes).
  (global $CONFIG_BUF i32 (i32.const 1024))
  (global $CONFIG_LIMIT i32 (i32.const 1024))
  ;; The expected token: base64 of the config (at most 4 * 342 = 1368 bytes).
  (global $EXPECTED_BUF i32 (i32.const 2048))
  ;; The Authorization header value(s), NUL-terminated (up to 8 KiB).
  (global $HEADER_BUF i32 (i32.const 4096))
  (global $HEADER_LIMIT i32 (i32.const 8192))

  ;; --- state -------------------------------------------------------------------
  (global $ready (mut i32) (i32.const 0))
  (global $expected_len (mut i32) (i32.const 0))

  ;; Writes the base64 digit for bits ($bits >> $shift) & 63 at $dst.
  (func $put_digit (param $dst i32) (param $bits i32) (param $shift i32)
    (i32.store8 (local.get $dst)
      (i32.load8_u
        (i32.add (global.get $B64_ALPHABET)
                 (i32.and (i32.shr_u (local.get $bits) (local.get $shift)) (i32.const 63))))))

  ;; Base64-encodes $len bytes at $src to $dst (with "=" padding); returns the
  ;; number of bytes written.
  (func $base64_encode (param $src i32) (param $len i32) (param $dst i32) (result i32)
    (local $in i32)    ;; next input offset
    (local $out i32)   ;; next output address
    (local $bits i32)  ;; up to 24 input bits, first byte highest
    (local $rest i32)  ;; input bytes left after the whole 3-byte groups
    (local.set $out (local.get $dst))

    ;; Whole groups: 3 bytes in, 4 digits out.
    (block $groups_done
      (loop $each_group
        (br_if $groups_done
          (i32.gt_u (i32.add (local.get $in) (i32.const 3)) (local.get $len)))
        (local.set $bits
          (i32.or
            (i32.or
              (i32.shl (i32.load8_u (i32.add (local.get $src) (local.get $in))) (i32.const 16))
              (i32.shl (i32.load8_u offset=1 (i32.add (local.get $src) (local.get $in))) (i32.const 8)))
            (i32.load8_u offset=2 (i32.add (local.get $src) (local.get $in)))))
        (call $put_digit (local.get $out) (local.get $bits) (i32.const 18))
        (call $put_digit (i32.add (local.get $out) (i32.const 1)) (local.get $bits) (i32.const 12))
        (call $put_digit (i32.add (local.get $out) (i32.const 2)) (local.get $bits) (i32.const 6))
        (call $put_digit (i32.add (local.get $out) (i32.const 3)) (local.get $bits) (i32.const 0))
        (local.set $in (i32.add (local.get $in) (i32.const 3)))
        (local.set $out (i32.add (local.get $out) (i32.const 4)))
        (br $each_group)))

    ;; The tail: 1 byte -> 2 digits + "==", 2 bytes -> 3 digits + "=".
    (local.set $rest (i32.sub (local.get $len) (local.get $in)))
    (if (i32.ne (local.get $rest) (i32.const 0))
      (then
        (local.set $bits
          (i32.shl (i32.load8_u (i32.add (local.get $src) (local.get $in))) (i32.const 16)))
        (if (i32.eq (local.get $rest) (i32.const 2))
          (then
            (local.set $bits
              (i32.or (local.get $bits)
                (i32.shl (i32.load8_u offset=1 (i32.add (local.get $src) (local.get $in)))
                         (i32.const 8))))))
        (call $put_digit (local.get $out) (local.get $bits) (i32.const 18))
        (call $put_digit (i32.add (local.get $out) (i32.const 1)) (local.get $bits) (i32.const 12))
        (if (i32.eq (local.get $rest) (i32.const 2))
          (then (call $put_digit (i32.add (local.get $out) (i32.const 2))
                                 (local.get $bits) (i32.const 6)))
          (else (i32.store8 offset=2 (local.get $out) (i32.const 0x3d))))  ;; '='
        (i32.store8 offset=3 (local.get $out) (i32.const 0x3d))            ;; '='
        (local.set $out (i32.add (local.get $out) (i32.const 4)))))

    (i32.sub (local.get $out) (local.get $dst)))

  ;; Reads the config once per instance and stores its base64 form at
  ;; $EXPECTED_BUF. Runs from _initialize, and from handle_request in case the
  ;; host did not call _initialize.
  (func $init
    (local $config_len i32)
    (if (global.get $ready) (then (return)))
    (local.set $config_len
      (call $get_config (global.get $CONFIG_BUF) (global.get $CONFIG_LIMIT)))
    ;; Empty, or too long to have been written: refuse to run.
    (if (i32.or (i32.eqz (local.get $config_len))
                (i32.gt_u (local.get $config_len) (global.get $CONFIG_LIMIT)))
      (then
        (call $log (global.get $LOG_ERROR)
          (global.get $BAD_CONFIG_MSG) (global.get $BAD_CONFIG_MSG_LEN))
        unreachable))
    (global.set $expected_len
      (call $base64_encode (global.get $CONFIG_BUF) (local.get $config_len)
                           (global.get $EXPECTED_BUF)))
    (global.set $ready (i32.const 1)))

  (func (export "_initialize")
    (call $init))

  ;; 1 if the $len bytes at $str start with the lowercase ASCII word at $word
  ;; ignoring case. (byte | 0x20) maps 'A'-'Z' to 'a'-'z'; for a letter in $word
  ;; only its two cases satisfy the test.
  (func $starts_with_ignore_case (param $str i32) (param $len i32)
                                 (param $word i32) (param $word_len i32) (result i32)
    (local $i i32)
    (if (i32.lt_u (local.get $len) (local.get $word_len))
      (then (return (i32.const 0))))
    (block $done
      (loop $each_byte
        (br_if $done (i32.ge_u (local.get $i) (local.get $word_len)))
        (if (i32.ne
              (i32.or (i32.load8_u (i32.add (local.get $str) (local.get $i))) (i32.const 0x20))
              (i32.load8_u (i32.add (local.get $word) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each_byte)))
    (i32.const 1))

  ;; 1 if the two byte strings are equal. Looks at every byte whatever the
  ;; differences, so the time taken does not tell where a guess went wrong.
  (func $equal_constant_time (param $a i32) (param $a_len i32)
                             (param $b i32) (param $b_len i32) (result i32)
    (local $i i32)
    (local $diff i32)
    (if (i32.ne (local.get $a_len) (local.get $b_len))
      (then (return (i32.const 0))))
    (block $done
      (loop $each_byte
        (br_if $done (i32.ge_u (local.get $i) (local.get $a_len)))
        (local.set $diff
          (i32.or (local.get $diff)
            (i32.xor (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                     (i32.load8_u (i32.add (local.get $b) (local.get $i))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each_byte)))
    (i32.eqz (local.get $diff)))

  ;; 1 if the request carries exactly one Authorization header and it is
  ;; "Basic <expected token>".
  (func $is_authorized (result i32)
    (local $count_len i64)
    (local $len i32)   ;; bytes written by the host, NUL terminator included
    (local $pos i32)   ;; offset in the header value
    (local.set $count_len
      (call $get_header_values (global.get $HEADER_REQUEST)
        (global.get $AUTHORIZATION) (global.get $AUTHORIZATION_LEN)
        (global.get $HEADER_BUF) (global.get $HEADER_LIMIT)))
    (local.set $len (i32.wrap_i64 (local.get $count_len)))

    ;; count (high 32 bits) must be 1; a value too long for the buffer was not
    ;; written, and is far longer than any token we accept anyway.
    (if (i64.ne (i64.shr_u (local.get $count_len) (i64.const 32)) (i64.const 1))
      (then (return (i32.const 0))))
    (if (i32.gt_u (local.get $len) (global.get $HEADER_LIMIT))
      (then (return (i32.const 0))))
    ;; Drop the NUL that ends the one value.
    (local.set $len (i32.sub (local.get $len) (i32.const 1)))

    ;; "Basic", any case, then at least one space.
    (if (i32.eqz (call $starts_with_ignore_case (global.get $HEADER_BUF) (local.get $len)
                                                (global.get $BASIC) (global.get $BASIC_LEN)))
      (then (return (i32.const 0))))
    (local.set $pos (global.get $BASIC_LEN))
    (if (i32.ge_u (local.get $pos) (local.get $len))
      (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u (i32.add (global.get $HEADER_BUF) (local.get $pos))) (i32.const 0x20))
      (then (return (i32.const 0))))
    (block $spaces_done
      (loop $each_space
        (br_if $spaces_done (i32.ge_u (local.get $pos) (local.get $len)))
        (br_if $spaces_done
          (i32.ne (i32.load8_u (i32.add (global.get $HEADER_BUF) (local.get $pos))) (i32.const 0x20)))
        (local.set $pos (i32.add (local.get $pos) (i32.const 1)))
        (br $each_space)))

    ;; The rest is the token.
    (call $equal_constant_time
      (i32.add (global.get $HEADER_BUF) (local.get $pos))
      (i32.sub (local.get $len) (local.get $pos))
      (global.get $EXPECTED_BUF) (global.get $expected_len)))

  ;; Called once per request. Result: ctx_next (next in the low 32 bits).
  (func (export "handle_request") (result i64)
    (call $init)
    (if (call $is_authorized)
      (then (return (i64.const 1))))
    ;; Refuse: a whole 401 response from the guest, next=0.
    (call $set_status_code (i32.const 401))
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $WWW_AUTHENTICATE) (global.get $WWW_AUTHENTICATE_LEN)
      (global.get $CHALLENGE) (global.get $CHALLENGE_LEN))
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $CONTENT_TYPE) (global.get $CONTENT_TYPE_LEN)
      (global.get $TEXT_PLAIN) (global.get $TEXT_PLAIN_LEN))
    (call $write_body (global.get $BODY_RESPONSE)
      (global.get $UNAUTHORIZED) (global.get $UNAUTHORIZED_LEN))
    (i64.const 0))

  ;; Nothing to do after the next handler.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32))
)
