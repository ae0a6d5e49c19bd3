;; noop: the cheapest possible guest.
;; handle_request returns next=1 (req_ctx 0); handle_response does nothing.
;; Measures the fixed cost of the host: instance checkout, two guest calls, return.
(module
  (memory (export "memory") 1)

  (func (export "handle_request") (result i64)
    (i64.const 1))

  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)))
