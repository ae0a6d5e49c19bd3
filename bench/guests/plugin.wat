;; plugin: models a real third-party plugin (a catalog header plugin, as TinyGo builds them):
;; per request it logs three times at debug level (filtered by the default level, as in
;; production), reads the clock through WASI, reads one request header and adds one response
;; header, then next=1.
;; Host calls per request: 5 http_handler calls (log x2 and get_header_values and
;; add_header_value in handle_request, log in handle_response) and one WASI clock_time_get.
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "http_handler" "log" (func $log (param i32 i32 i32)))
  (import "http_handler" "get_header_values"
    (func $get_header_values (param i32 i32 i32 i32 i32) (result i64)))
  (import "http_handler" "add_header_value"
    (func $add_header_value (param i32 i32 i32 i32 i32)))

  (memory (export "memory") 1)

  (data (i32.const 0) "plugin: handling request")   ;; 24 bytes
  (data (i32.const 32) "plugin: header added")      ;; 20 bytes
  (data (i32.const 64) "plugin: response seen")     ;; 21 bytes
  (data (i32.const 96) "user-agent")                ;; 10 bytes
  (data (i32.const 112) "x-plugin")                 ;; 8 bytes
  (data (i32.const 128) "catalog")                  ;; 7 bytes

  ;; the clock is written at 512; header values are read into [1024, 65536)
  (func (export "handle_request") (result i64)
    (call $log (i32.const -1) (i32.const 0) (i32.const 24))
    (drop (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 512)))
    (drop (call $get_header_values (i32.const 0)
      (i32.const 96) (i32.const 10) (i32.const 1024) (i32.const 64512)))
    (call $add_header_value (i32.const 1)
      (i32.const 112) (i32.const 8) (i32.const 128) (i32.const 7))
    (call $log (i32.const -1) (i32.const 32) (i32.const 20))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (call $log (i32.const -1) (i32.const 64) (i32.const 21))))
