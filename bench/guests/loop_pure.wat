;; loop_pure (micro benchmark): the loop of loop_host.wat with no host call inside,
;; so (time(loop_host) - time(loop_pure)) / N is the cost of one host call.
;; N is the decimal guest config (e.g. "100000"); 100000 when the config is empty.
(module
  (import "http_handler" "get_config"
    (func $get_config (param i32 i32) (result i32)))

  (memory (export "memory") 1)

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

  ;; the accumulator goes through memory each turn so the loop cannot be folded away
  (func (export "handle_request") (result i64)
    (local $n i32)
    (local $i i32)
    (local.set $n (call $count))
    (block $done
      (loop $turns
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 3)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $turns)))
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
