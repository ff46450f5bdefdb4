"""Train a small MLP on generated 8x8 'digit' images: define, compile, fit, evaluate, predict.

The data is made here (ten noisy glyph prototypes), so nothing is downloaded at run time.
Weights go to outputs/model.weights.h5, predictions on new data to outputs/predictions.csv.
"""

import argparse
import os

import numpy as np


def make_digits(n, rng, prototypes):
    labels = rng.integers(0, 10, size=n)
    images = prototypes[labels] + rng.normal(0.0, 0.8, size=(n, 64))
    return images.astype("float32"), labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from keras import layers, models  # imported late: the backend is chosen by the environment

    rng = np.random.default_rng(1234)
    prototypes = (rng.random((10, 64)) > 0.5).astype("float32")
    x_train, y_train = make_digits(4000, rng, prototypes)
    x_test, y_test = make_digits(1000, rng, prototypes)
    x_new, _ = make_digits(20, rng, prototypes)

    model = models.Sequential(
        [
            layers.Input(shape=(64,)),
            layers.Dense(64, activation="relu"),
            layers.Dense(32, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
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
