"""How many batches does the selection's BatchNorm re-estimation need? (issue 14: `score` is the selection's
largest non-training cost on the CIFAR protocol.)

Every rung of a selection scores each candidate after re-estimating its BatchNorm statistics on
`bn_recalibration_batches` training batches (default 20) and evaluating the 5k validation images. This script
takes the fine-tuned candidate checkpoints a selection left behind (``<workdir>/selection/*.keras``), and for
each number of batches re-estimates with several data orders and prints the validation accuracy (mean and
spread over the orders) and the seconds of the re-estimation and of the validation pass, measured in the same
process, alternated. Fewer batches are only worth it if the accuracy and the candidates' order stay put.

  python benchmarks/recalibration_batches.py --selection runs/bench_mskd_cifar/select_s1_minparams0.9

Writes benchmarks/results/recalibration_batches.json.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selection", required=True, help="a select() workdir holding selection/*.keras")
    parser.add_argument("--dataset", default=f"folder:{results_io.SHARED_CIFAR10}")
    parser.add_argument("--batches", default="5,10,20,40", help="comma-separated numbers of batches to compare "
                        "(0: no re-estimation, the moving statistics as fine-tuned)")
    parser.add_argument("--orders", type=int, default=3, help="data orders (shuffle seeds) per setting")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()

    from mskd_tf import training

    with training.fused_batchnorm():  # the kernel select() scores with, so the seconds are the selection's
        run(args)


def run(args):
    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import training
    from mskd_tf.batchnorm import recalibrate_batchnorm

    files = sorted(Path(args.selection, "selection").glob("*.keras"))
    if not files:
        sys.exit(f"error: no candidate checkpoints in {args.selection}/selection; pass a select() workdir.")
    splits = data_lib.load(args.dataset, batch_size=args.batch_size, seed=0)
    counts = [int(b) for b in args.batches.split(",")]
    rows = []
    for path in files:
        trained = keras.models.load_model(path, compile=False)
        work = keras.models.clone_model(trained)
        row = {"candidate": path.stem, "by_batches": {}}
        for order in range(args.orders):
            train = data_lib.train_pipeline(splits.arrays["train"], args.batch_size, augment=True, seed=100 + order)
            for count in counts:  # alternated, so load changes hit every setting alike
                work.set_weights(trained.get_weights())
                began = time.perf_counter()
                if count:  # 0: the moving statistics the fine-tuning left (what scoring without re-estimation sees)
                    recalibrate_batchnorm(work, train, count)
                recal = time.perf_counter() - began
                began = time.perf_counter()
                acc = training.accuracy(work, splits.val, "val")
                evaluate = time.perf_counter() - began
                cell = row["by_batches"].setdefault(str(count), {"val_acc": [], "recal_s": [], "eval_s": []})
                cell["val_acc"].append(acc)
                cell["recal_s"].append(round(recal, 2))
                cell["eval_s"].append(round(evaluate, 2))
        for count, cell in row["by_batches"].items():
            accs = cell["val_acc"]
            cell["mean"], cell["spread"] = statistics.mean(accs), max(accs) - min(accs)
            print(f"{row['candidate']:>18} {count:>3} batches: val {100 * cell['mean']:.2f}% "
                  f"(spread {100 * cell['spread']:.2f} over {len(accs)} orders), re-estimate "
                  f"{statistics.median(cell['recal_s']):.1f} s, validation {statistics.median(cell['eval_s']):.1f} s",
                  flush=True)
        rows.append(row)
    order_by = {str(c): [r["candidate"] for r in sorted(rows, key=lambda r: -r["by_batches"][str(c)]["mean"])]
                for c in counts}
    for count, ranked in order_by.items():
        print(f"order with {count:>3} batches: {', '.join(ranked)}")
    results_io.write_results("recalibration_batches", {"selection": args.selection, "orders": args.orders,
                                                       "rows": rows, "candidate_order": order_by})


if __name__ == "__main__":
    main()
