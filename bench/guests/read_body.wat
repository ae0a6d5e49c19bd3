;; read_body: reads the whole request body with read_body (4 KiB chunks) until eof,
;; then next=1. Used with a 4 KiB POST body.
;; _initialize enables buffer_request (1) so the downstream still receives the whole
;; original body and answers its length exactly as it does without the guest: the
;; two sides of the comparison do the same downstream work.
(module
  (import "http_handler" "enable_features"
    (func $enable_features (param i32) (result i32)))
  (import "http_handler" "read_body"
    (func $read_body (param i32 i32 i32) (result i64)))

  (memory (export "memory") 1)

  (func (export "_initialize")
    (drop (call $enable_features (i32.const 1))))

  ;; every chunk lands in [1024, 5120); the guest only counts the bytes
  (func (export "handle_request") (result i64)
    (local $r i64)
    (local $total i32)
    (block $eof
      (loop $read
        (local.set $r (call $read_body (i32.const 0) (i32.const 1024) (i32.const 4096)))
        (local.set $total (i32.add (local.get $total) (i32.wrap_i64 (local.get $r))))
        (br_if $eof (i64.ne (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 0)))
        (br $read)))
    ;; keep the count observable (and the loop un-removable) in memory at 0
    (i32.store (i32.const 0) (local.get $total))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
