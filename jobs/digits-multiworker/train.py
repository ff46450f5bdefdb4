"""The digits MLP trained data-parallel across instances: tf.distribute.MultiWorkerMirroredStrategy.

cloudtrain starts this same script on every node with TF_CONFIG naming all of them
(node 0 is the chief) and CLOUDTRAIN_NODE_RANK / CLOUDTRAIN_NUM_NODES set. The strategy
reads TF_CONFIG itself: each worker takes its share of every batch, the gradients are
summed across all the workers' GPUs (collective ops over gRPC), and every worker ends
with the same weights, which the last line of each worker's log shows as a digest.

Every worker calls fit, evaluate, predict and save_weights: under the strategy they are
steps all workers take together. Only the chief writes into outputs/, which cloudtrain
brings home; the others save to a scratch folder.

Needs `keras: 2` (tf-keras): Keras 3's fit fails under this strategy (keras-team/keras#20585).
"""

import argparse
import hashlib
import os

import numpy as np


def make_digits(n, rng, prototypes):
    labels = rng.integers(0, 10, size=n)
    images = prototypes[labels] + rng.normal(0.0, 0.8, size=(n, 64))
    return images.astype("float32"), labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    args = parser.parse_args()

    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = int(os.environ.get("CLOUDTRAIN_NODE_RANK", "0"))
    nodes = int(os.environ.get("CLOUDTRAIN_NUM_NODES", "1"))
    print(f"MultiWorkerMirroredStrategy: node {rank} of {nodes}, {strategy.num_replicas_in_sync} replicas")

    import keras  # tf-keras under `keras: 2`
    from keras import layers, models

    rng = np.random.default_rng(1234)  # the same data on every worker; the strategy shards it
    prototypes = (rng.random((10, 64)) > 0.5).astype("float32")
    x_train, y_train = make_digits(4000, rng, prototypes)
    x_test, y_test = make_digits(1000, rng, prototypes)
    x_new, _ = make_digits(20, rng, prototypes)

    with strategy.scope():
        model = models.Sequential(
            [
                layers.Input(shape=(64,)),
                layers.Dense(64, activation="relu"),
                layers.Dense(32, activation="relu"),
                layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(f"Keras {keras.__version__}")
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size * strategy.num_replicas_in_sync,  # the global batch
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test loss {loss:.4f} accuracy {accuracy:.4f}")

    outputs = "outputs" if rank == 0 else os.path.join("scratch", "outputs")
    os.makedirs(outputs, exist_ok=True)
    model.save_weights(os.path.join(outputs, "model.weights.h5"))
    predictions = model.predict(x_new, verbose=0)
    if rank == 0:
        with open(os.path.join(outputs, "predictions.csv"), "w") as out:
            out.write("sample,predicted_class,confidence\n")
            for i, row in enumerate(predictions):
                out.write(f"{i},{int(row.argmax())},{float(row.max()):.4f}\n")
        print("saved outputs/model.weights.h5 and outputs/predictions.csv")
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    print(f"node {rank} weights sha256 {hashlib.sha256(weights.tobytes()).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
