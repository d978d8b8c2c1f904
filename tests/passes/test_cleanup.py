"""dce and cse: Before/Expected IR text plus a numeric check of each rewrite."""


def test_dce_removes_dead_chains_and_unused_params(check_pass):
    check_pass("""
        param @w : f32[4]
        param @unused : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.mul(%x, @w) : f32[4]
          %1 = core.exp(%x) : f32[4]
          %2 = core.add(%1, @unused) : f32[4]
          %3 = core.neg(%2) : f32[4]
          return %0
        }
        """, "dce", """
        param @w : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.mul(%x, @w) : f32[4]
          return %0
        }
        """)


def test_dce_params_false_keeps_parameters(check_pass):
    check_pass("""
        param @unused : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.add(%x, @unused) : f32[4]
          return %x
        }
        """, "dce{params=false}", """
        param @unused : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          return %x
        }
        """)


def test_dce_keeps_impure_ops_and_their_operands(check_pass):
    check_pass("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.exp(%x) : f32[4]
          %1 = dist.all_reduce(%0) : f32[4]
          %2 = core.neg(%x) : f32[4]
          return %x
        }
        """, "dce", """
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.exp(%x) : f32[4]
          %1 = dist.all_reduce(%0) : f32[4]
          return %x
        }
        """)


def test_cse_merges_duplicates_and_commutative_operand_orders(check_pass):
    check_pass("""
        func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.add(%x, %y) : f32[4]
          %1 = core.add(%y, %x) : f32[4]
          %2 = core.exp(%0) : f32[4]
          %3 = core.exp(%1) : f32[4]
          %4 = core.mul(%2, %3) : f32[4]
          %5 = core.mul(%3, %2) : f32[4]
          return %4, %5, %2
        }
        """, "cse", """
        func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.add(%x, %y) : f32[4]
          %2 = core.exp(%0) : f32[4]
          %4 = core.mul(%2, %2) : f32[4]
          return %4, %4, %2
        }
        """)


def test_cse_keeps_non_commutative_orders_and_different_attributes(check_pass):
    text = """
        func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4,1], f32[1,4]) {
          %0 = core.sub(%x, %y) : f32[4]
          %1 = core.sub(%y, %x) : f32[4]
          %2 = core.reshape(%x) {shape=[4,1]} : f32[4,1]
          %3 = core.reshape(%x) {shape=[1,4]} : f32[1,4]
          return %0, %1, %2, %3
        }
        """
    check_pass(text, "cse", text)


def test_cse_merges_equal_constants_only(check_pass):
    check_pass("""
        func @main(%x: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.constant() {value=2.0, dtype=f32} : f32[]
          %2 = core.constant() {value=3.0, dtype=f32} : f32[]
          %3 = core.mul(%x, %0) : f32[4]
          %4 = core.mul(%x, %1) : f32[4]
          %5 = core.mul(%x, %2) : f32[4]
          return %3, %4, %5
        }
        """, "cse", """
        func @main(%x: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %2 = core.constant() {value=3.0, dtype=f32} : f32[]
          %3 = core.mul(%x, %0) : f32[4]
          %5 = core.mul(%x, %2) : f32[4]
          return %3, %3, %5
        }
        """)


def test_cse_never_merges_or_drops_impure_ops(check_pass):
    text = """
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = dist.all_reduce(%x) : f32[4]
          %1 = dist.all_reduce(%x) : f32[4]
          %2 = dist.all_reduce(%x) : f32[4]
          return %0, %1
        }
        """
    check_pass(text, "cse,dce", text)


def test_cse_then_dce_cleans_up_after_canonicalize(check_pass):
    check_pass("""
        param @w : f32[8,4]
        func @main(%x: f32[T,4]) -> (f32[T,8]) {
          %0 = llm.linear(%x, @w) : f32[T,8]
          %1 = llm.linear(%x, @w) : f32[T,8]
          %2 = core.constant() {value=0.0, dtype=f32} : f32[]
          %3 = core.add(%1, %2) : f32[T,8]
          %4 = core.add(%0, %3) : f32[T,8]
          return %4
        }
        """, "canonicalize,cse,dce", """
        param @w : f32[8,4]
        func @main(%x: f32[T,4]) -> (f32[T,8]) {
          %0 = llm.linear(%x, @w) : f32[T,8]
          %4 = core.add(%0, %0) : f32[T,8]
          return %4
        }
        """, {"T": 3})


def test_cse_keeps_constants_of_signed_zero_apart(check_pass):
    # 0.0 == -0.0 in Python, but x/0.0 is +inf where x/-0.0 is -inf
    text = """
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.constant() {value=0.0, dtype=f32} : f32[]
          %1 = core.constant() {value=-0.0, dtype=f32} : f32[]
          %2 = core.div(%x, %0) : f32[4]
          %3 = core.div(%x, %1) : f32[4]
          return %2, %3
        }
        """
    check_pass(text, "cse", text)
