"""profiling.wrapper_ab compiles each side cold in a process of its own; a side that cannot compile stops the
comparison with that side's own error, not a bare CalledProcessError. (Its timings are not part of CI.)"""
import pytest

from dtql_fast.profiling import wrapper_ab


def test_a_side_that_fails_to_compile_is_named_with_its_error():
    with pytest.raises(SystemExit, match=r"(?s)error: side 'candidate' \(\{\"no_such_inductor_option\": 1\}\) "
                                         r"failed to compile the step:.*no_such_inductor_option"):
        wrapper_ab.main(["--task", "walker2d-medium-v2", "--threads", "1", "--candidate",
                         '{"no_such_inductor_option": 1}'])
