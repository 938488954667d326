"""DGM as an Avalanche strategy on a SplitMNIST-style benchmark built from local files (README, "DGM in Avalanche").

    python examples/avalanche_dgm.py                       # 10 experiences of one MNIST digit, the quick preset
    python examples/avalanche_dgm.py --protocol 5x2 --epochs 5
"""
import argparse

from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin

from dgm.avalanche import DGMStrategy, make_benchmark
from dgm.presets import make_config

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist, svhn, cifar10_shared, ... or synthetic")
p.add_argument("--protocol", default="10x1", choices=("10x1", "5x2"))
p.add_argument("--epochs", type=int, help="epochs per experience (default: the quick preset's)")
p.add_argument("--experiences", type=int, help="train only the first experiences")
p.add_argument("--max-train-per-class", type=int)
args = p.parse_args()

config = make_config(args.dataset, "dgmw", "quick", epochs=args.epochs)
benchmark, tasks = make_benchmark(args.dataset, args.protocol,
                                  max_train_per_class=args.max_train_per_class or config.max_train_per_class)
evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
                             bwt_metrics(stream=True), loggers=[InteractiveLogger()])
strategy = DGMStrategy(config=config, n_classes=sum(len(t.positions) for t in tasks), evaluator=evaluator)
for experience in benchmark.train_stream[: args.experiences]:
    strategy.train(experience)
    metrics = strategy.eval(benchmark.test_stream[: experience.current_experience + 1])
print(f"final accuracy over the classes seen: {100 * metrics['Top1_Acc_Stream/eval_phase/test_stream']:.2f} %")
