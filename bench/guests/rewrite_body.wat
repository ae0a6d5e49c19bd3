;; rewrite_body: buffers the downstream's response and sends it back upper-cased.
;; _initialize enables buffer_response (2) for every request of this guest.
;; handle_response reads the whole response body with read_body in 4 KiB chunks
;; (growing memory as needed), upper-cases ASCII a-z in place, and writes it back
;; with one write_body (the first write in the phase replaces the body).
;; "hello world\n" becomes "HELLO WORLD\n".
(module
  (import "http_handler" "enable_features"
    (func $enable_features (param i32) (result i32)))
  (import "http_handler" "read_body"
    (func $read_body (param i32 i32 i32) (result i64)))
  (import "http_handler" "write_body"
    (func $write_body (param i32 i32 i32)))

  (memory (export "memory") 2)

  ;; the body is accumulated from 64 KiB upwards
  (global $base i32 (i32.const 65536))
  (global $chunk i32 (i32.const 4096))

  (func (export "_initialize")
    (drop (call $enable_features (i32.const 2))))

  (func (export "handle_request") (result i64)
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (local $len i32)
    (local $r i64)
    (local $i i32)
    (local $b i32)
    (if (local.get $is_error) (then (return)))
    ;; read until eof
    (block $eof
      (loop $read
        ;; make room for one more chunk
        (if (i32.gt_u
              (i32.add (i32.add (global.get $base) (local.get $len)) (global.get $chunk))
              (i32.shl (memory.size) (i32.const 16)))
          (then
            (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
              (then (unreachable)))))
        (local.set $r (call $read_body (i32.const 1)
          (i32.add (global.get $base) (local.get $len)) (global.get $chunk)))
        (local.set $len (i32.add (local.get $len) (i32.wrap_i64 (local.get $r))))
        (br_if $eof (i64.ne (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 0)))
        (br $read)))
    ;; upper-case a-z
    (block $done
      (loop $up
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $b (i32.load8_u (i32.add (global.get $base) (local.get $i))))
        (if (i32.lt_u (i32.sub (local.get $b) (i32.const 97)) (i32.const 26))
          (then
            (i32.store8 (i32.add (global.get $base) (local.get $i))
              (i32.sub (local.get $b) (i32.const 32)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $up)))
    (call $write_body (i32.const 1) (global.get $base) (local.get $len))))
