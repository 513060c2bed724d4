"""A small model trained by real gradient descent, instrumented with cirron-otel.

A two-layer network learns y = sin(3x) + noise with mini-batch SGD (NumPy only). Every
epoch and batch is a scope, the forward and backward passes are scopes inside them, the
loss is a point mark per batch and the validation loss a summary mark per epoch. One
validation step fails on purpose, to show how an exception is recorded.

    python examples/train.py            # writes ./.cirron/spool and prints the trace
"""

from __future__ import annotations

import argparse

import numpy as np

import cirron_otel as ci


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, size=(n, 1))
    y = np.sin(3.0 * x) + 0.05 * rng.normal(size=(n, 1))
    return x, y


class TwoLayerNet:
    def __init__(self, rng: np.random.Generator, hidden: int) -> None:
        self.w1 = rng.normal(scale=1.0, size=(1, hidden))
        self.b1 = np.zeros(hidden)
        self.w2 = rng.normal(scale=1.0 / np.sqrt(hidden), size=(hidden, 1))
        self.b2 = np.zeros(1)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.tanh(x @ self.w1 + self.b1)
        return h, h @ self.w2 + self.b2

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        with ci.scope("forward"):
            h, pred = self.forward(x)
            err = pred - y
            loss = float(np.mean(err**2))
        with ci.scope("backward"):
            g_pred = 2.0 * err / len(x)
            g_w2 = h.T @ g_pred
            g_h = (g_pred @ self.w2.T) * (1.0 - h**2)
            self.w2 -= lr * g_w2
            self.b2 -= lr * g_pred.sum(axis=0)
            self.w1 -= lr * (x.T @ g_h)
            self.b1 -= lr * g_h.sum(axis=0)
            ci.mark("grad_norm", float(np.linalg.norm(g_w2)))
        return loss


def validate(net: TwoLayerNet, x: np.ndarray, y: np.ndarray, epoch: int) -> float:
    with ci.scope("validate", samples=len(x)):
        if epoch == 1:
            # A deliberate failure: the scope records error=True, error.type, error.message.
            raise FloatingPointError("validation set went missing (on purpose, for the demo)")
        _, pred = net.forward(x)
        return float(np.mean((pred - y) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--output-dir", default=None, help="spool location (default ./.cirron)")
    args = parser.parse_args()

    ci.profile(output_dir=args.output_dir, session_attrs={"model": "two-layer-tanh", "lr": args.lr})
    rng = np.random.default_rng(7)
    net = TwoLayerNet(rng, hidden=32)
    x_val, y_val = make_data(rng, 256)

    for epoch in ci.epochs(range(args.epochs)):
        losses = []
        lr = args.lr * 0.8**epoch  # a step decay: a learning-rate curve to chart
        for _ in ci.batches(range(args.batches)):
            x, y = make_data(rng, args.batch_size)
            loss = net.step(x, y, lr)
            ci.mark("lr", lr)
            ci.mark("loss", loss)
            losses.append(loss)
        try:
            val = validate(net, x_val, y_val, epoch)
            ci.mark("val_loss", val, kind="summary")
        except FloatingPointError as exc:
            print(f"epoch {epoch}: validation failed: {exc}")
        ci.mark("train_loss", float(np.mean(losses)), kind="summary", batches=len(losses))

    health = ci.health()
    ci.trace()  # prints the tree of closed spans (as cirron-sdk does in a script)
    ci.shutdown()
    print(
        f"\nspool: {health['spool_dir']}  "
        f"records: {ci.health()['records_written']} written, "
        f"{health['mark_drop_count'] + health['span_drop_count']} dropped"
    )


if __name__ == "__main__":
    main()
