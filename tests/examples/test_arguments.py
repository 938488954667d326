"""The ports refuse arguments that would train nothing or make no sense, naming the argument and the value."""
import pytest

PORTS = ["hat_split_mnist", "packnet_split_mnist", "piggyback_split_mnist"]


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["--epochs", "-1"], "--epochs: expected a positive integer, got -1"),
    (["--hidden", "two"], "--hidden: expected a positive integer, got 'two'"),
    (["--max-train-per-class", "0"], "--max-train-per-class: expected a positive integer, got 0"),
    (["--threads", "-2"], "--threads: expected a positive integer, got -2"),
])
def test_bad_arguments_are_refused(load_example, capsys, port, argv, named):
    module = load_example(port)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--synthetic", *argv])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_packnet_refuses_a_keep_fraction_outside_0_1(load_example, capsys):
    module = load_example("packnet_split_mnist")
    with pytest.raises(SystemExit):
        module.main(["--synthetic", "--keep", "1.5"])
    assert "--keep must be in (0, 1], got 1.5" in capsys.readouterr().err
