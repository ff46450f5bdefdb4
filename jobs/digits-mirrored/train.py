"""The digits MLP trained data-parallel on every GPU of one instance: tf.distribute.MirroredStrategy.

Each GPU holds a replica of the model and takes its share of every batch; the gradients
are summed across the replicas (all-reduce) before each update, so the replicas stay
identical and one step processes ``--batch-size`` samples per replica. Only the model's
creation and compile go under ``strategy.scope()``; fit, evaluate, predict and
save_weights are the usual calls.

cloudtrain sets CLOUDTRAIN_GPUS_PER_NODE to the instance type's GPU count. Where
TensorFlow sees no GPU (a --dry-run, on the CPU) the CPU is split into that many logical
devices, so the strategy mirrors across as many replicas as the real instance would.
Runs under `keras: 3` (Keras 3) and `keras: 2` (tf-keras) alike.
"""

import argparse
import os

import numpy as np


def make_digits(n, rng, prototypes):
    labels = rng.integers(0, 10, size=n)
    images = prototypes[labels] + rng.normal(0.0, 0.8, size=(n, 64))
    return images.astype("float32"), labels


def mirrored_strategy():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()  # every GPU of the instance
    replicas = int(os.environ.get("CLOUDTRAIN_GPUS_PER_NODE", "2"))
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="per replica")
    args = parser.parse_args()

    strategy = mirrored_strategy()
    replicas = strategy.num_replicas_in_sync
    devices = ", ".join(d.rsplit("device:", 1)[-1] for d in strategy.extended.worker_devices)
    print(f"MirroredStrategy: {replicas} replicas ({devices})")

    import keras  # Keras 3, or tf-keras under `keras: 2`
    from keras import layers, models

    rng = np.random.default_rng(1234)
    prototypes = (rng.random((10, 64)) > 0.5).astype("float32")
    x_train, y_train = make_digits(4000, rng, prototypes)
    x_test, y_test = make_digits(1000, rng, prototypes)
    x_new, _ = make_digits(20, rng, prototypes)

    with strategy.scope():  # the variables are created once per replica, kept in step
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
        batch_size=args.batch_size * replicas,  # the global batch: each replica gets batch_size
        validation_split=0.1,
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test loss {loss:.4f} accuracy {accuracy:.4f}")

    os.makedirs("outputs", exist_ok=True)
    model.save_weights("outputs/model.weights.h5")
    predictions = model.predict(x_new, verbose=0)
    with open("outputs/predictions.csv", "w") as out:
        out.write("sample,predicted_class,confidence\n")
        for i, row in enumerate(predictions):
            out.write(f"{i},{int(row.argmax())},{float(row.max()):.4f}\n")
    print("saved outputs/model.weights.h5 and outputs/predictions.csv")


if __name__ == "__main__":
    main()
