"""Keras 2 as the seed article wrote it: Sequential, input_dim=, compile, fit, evaluate,
predict, save_weights('model.h5'). Runs on Theano (backend: theano) and on TensorFlow
through tf-keras (backend: tensorflow, keras: 2); Python 3.7+.

The data is made here (ten noisy 8x8 glyph prototypes): nothing is downloaded.
Outputs: outputs/model.h5 (weights), outputs/predictions.csv (new data), outputs/scores.txt.
"""

import argparse
import os

import numpy as np
from keras.layers import Dense, Dropout
from keras.models import Sequential
from keras.optimizers import SGD
from keras.utils import to_categorical


def make_digits(n, rng, prototypes):
    labels = rng.randint(0, 10, size=n)
    images = prototypes[labels] + rng.normal(0.0, 0.8, size=(n, 64))
    return images.astype("float32"), labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    rng = np.random.RandomState(1234)  # the data; the model's own randomness follows `seed:`
    prototypes = (rng.rand(10, 64) > 0.5).astype("float32")
    x_train, y_train = make_digits(4000, rng, prototypes)
    x_test, y_test = make_digits(1000, rng, prototypes)
    x_new, _ = make_digits(20, rng, prototypes)

    model = Sequential()
    model.add(Dense(64, input_dim=64, activation="relu"))
    model.add(Dropout(0.2))
    model.add(Dense(32, activation="relu"))
    model.add(Dense(10, activation="softmax"))
    model.compile(
        loss="categorical_crossentropy",
        optimizer=SGD(learning_rate=0.05, momentum=0.9),
        metrics=["accuracy"],
    )
    model.fit(x_train, to_categorical(y_train, 10), epochs=args.epochs, batch_size=args.batch_size, verbose=2)
    loss, accuracy = model.evaluate(x_test, to_categorical(y_test, 10), verbose=0)
    print(f"test loss {loss:.4f} accuracy {accuracy:.4f}")

    os.makedirs("outputs", exist_ok=True)
    model.save_weights("outputs/model.h5")
    predictions = model.predict(x_new)
    with open("outputs/predictions.csv", "w") as out:
        out.write("sample,predicted_class,confidence\n")
        for i, row in enumerate(predictions):
            out.write(f"{i},{int(row.argmax())},{float(row.max()):.6f}\n")
    with open("outputs/scores.txt", "w") as out:
        out.write(f"loss {loss:.6f}\naccuracy {accuracy:.6f}\n")
    print("saved outputs/model.h5 and outputs/predictions.csv")


if __name__ == "__main__":
    main()
