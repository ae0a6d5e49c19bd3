;; loop_host (micro benchmark): handle_request calls get_method(buf, 0) N times, next=1.
;; buf_limit 0 makes get_method only compute the length: the cheapest host call there is.
;; N is the decimal guest config (e.g. "100000"); 100000 when the config is empty.
;; Compare with loop_pure.wat, the same loop without the host call.
(module
  (import "http_handler" "get_config"
    (func $get_config (param i32 i32) (result i32)))
  (import "http_handler" "get_method"
    (func $get_method (param i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; parse up to 16 config bytes at 1024 as a decimal count; default 100000
  (func $count (result i32)
    (local $len i32)
    (local $i i32)
    (local $n i32)
    (local $d i32)
    (local.set $len (call $get_config (i32.const 1024) (i32.const 16)))
    (if (i32.or (i32.eqz (local.get $len)) (i32.gt_u (local.get $len) (i32.const 16)))
      (then (return (i32.const 100000))))
    (block $done
      (loop $digits
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $d (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 48)))
        (br_if $done (i32.ge_u (local.get $d) (i32.const 10)))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $d)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digits)))
    (local.get $n))

  (func (export "handle_request") (result i64)
    (local $n i32)
    (local $i i32)
    (local.set $n (call $count))
    (block $done
      (loop $calls
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store (i32.const 0)
          (i32.add (i32.load (i32.const 0)) (call $get_method (i32.const 0) (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $calls)))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
