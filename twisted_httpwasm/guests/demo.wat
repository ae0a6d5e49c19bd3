;; demo.wat: the guest that `twistd -n httpwasm` runs when given no --guest.
;;
;;   /hello (with or without a query)
;;              the guest answers by itself: 200, content-type: text/plain,
;;              x-httpwasm: demo, and a short body; the downstream never sees
;;              the request.
;;   otherwise  the guest adds the request header x-httpwasm-guest: demo (the
;;              downstream sees it) and the response header x-httpwasm: demo
;;              (the client sees it), then passes the request on (next=1).
;;
;; It imports only the http_handler functions it uses; no WASI.
(module
  ;; --- host functions (module "http_handler") -------------------------------
  (import "http_handler" "get_uri"
    (func $get_uri (param $buf i32) (param $buf_limit i32) (result i32)))
  (import "http_handler" "set_status_code"
    (func $set_status_code (param $code i32)))
  (import "http_handler" "set_header_value"
    (func $set_header_value (param $kind i32) (param $name i32) (param $name_len i32)
                            (param $value i32) (param $value_len i32)))
  (import "http_handler" "write_body"
    (func $write_body (param $kind i32) (param $body i32) (param $body_len i32)))

  (memory (export "memory") 1)

  ;; --- ABI constants -----------------------------------------------------------
  (global $HEADER_REQUEST i32 (i32.const 0))
  (global $HEADER_RESPONSE i32 (i32.const 1))
  (global $BODY_RESPONSE i32 (i32.const 1))

  ;; --- constant strings: offset and length of each ------------------------------
  (data (i32.const 0) "/hello")
  (global $HELLO_PATH i32 (i32.const 0))
  (global $HELLO_PATH_LEN i32 (i32.const 6))

  (data (i32.const 16) "x-httpwasm")
  (global $MARK_NAME i32 (i32.const 16))
  (global $MARK_NAME_LEN i32 (i32.const 10))

  (data (i32.const 32) "x-httpwasm-guest")
  (global $SEEN_NAME i32 (i32.const 32))
  (global $SEEN_NAME_LEN i32 (i32.const 16))

  (data (i32.const 48) "demo")
  (global $DEMO i32 (i32.const 48))
  (global $DEMO_LEN i32 (i32.const 4))

  (data (i32.const 64) "content-type")
  (global $CONTENT_TYPE i32 (i32.const 64))
  (global $CONTENT_TYPE_LEN i32 (i32.const 12))

  (data (i32.const 80) "text/plain; charset=utf-8")
  (global $TEXT_PLAIN i32 (i32.const 80))
  (global $TEXT_PLAIN_LEN i32 (i32.const 25))

  (data (i32.const 128) "hello from the demo guest: this answer was written in WebAssembly, and the downstream never saw the request\n")
  (global $HELLO_BODY i32 (i32.const 128))
  (global $HELLO_BODY_LEN i32 (i32.const 108))

  ;; The URI is read here, up to the end of the first page.
  (global $URI_BUF i32 (i32.const 1024))
  (global $URI_BUF_LIMIT i32 (i32.const 64512))

  ;; 1 if the request URI is /hello or /hello?query.  A URI longer than the
  ;; buffer is not written (buf/buf_limit rule), and is not /hello either.
  (func $is_hello (result i32)
    (local $len i32)
    (local $i i32)
    (local.set $len (call $get_uri (global.get $URI_BUF) (global.get $URI_BUF_LIMIT)))
    (if (i32.gt_u (local.get $len) (global.get $URI_BUF_LIMIT))
      (then (return (i32.const 0))))
    (if (i32.lt_u (local.get $len) (global.get $HELLO_PATH_LEN))
      (then (return (i32.const 0))))
    (block $done
      (loop $each_byte
        (br_if $done (i32.ge_u (local.get $i) (global.get $HELLO_PATH_LEN)))
        (if (i32.ne (i32.load8_u (i32.add (global.get $URI_BUF) (local.get $i)))
                    (i32.load8_u (i32.add (global.get $HELLO_PATH) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each_byte)))
    ;; Exactly "/hello", or "/hello" followed by the query.
    (if (i32.eq (local.get $len) (global.get $HELLO_PATH_LEN))
      (then (return (i32.const 1))))
    (i32.eq
      (i32.load8_u (i32.add (global.get $URI_BUF) (global.get $HELLO_PATH_LEN)))
      (i32.const 63)))  ;; '?'

  ;; Called once per request. Result: ctx_next (next in the low 32 bits).
  (func (export "handle_request") (result i64)
    ;; Every response carries the mark, whoever writes its body.
    (call $set_header_value (global.get $HEADER_RESPONSE)
      (global.get $MARK_NAME) (global.get $MARK_NAME_LEN)
      (global.get $DEMO) (global.get $DEMO_LEN))

    ;; /hello: build the whole response here and stop (next=0).
    (if (call $is_hello)
      (then
        (call $set_status_code (i32.const 200))
        (call $set_header_value (global.get $HEADER_RESPONSE)
          (global.get $CONTENT_TYPE) (global.get $CONTENT_TYPE_LEN)
          (global.get $TEXT_PLAIN) (global.get $TEXT_PLAIN_LEN))
        (call $write_body (global.get $BODY_RESPONSE)
          (global.get $HELLO_BODY) (global.get $HELLO_BODY_LEN))
        (return (i64.const 0))))

    ;; Anything else: tell the downstream a guest saw the request, and pass it on.
    (call $set_header_value (global.get $HEADER_REQUEST)
      (global.get $SEEN_NAME) (global.get $SEEN_NAME_LEN)
      (global.get $DEMO) (global.get $DEMO_LEN))
    (i64.const 1))

  ;; Nothing to do after the next handler.
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32))
)
