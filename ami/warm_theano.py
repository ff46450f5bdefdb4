"""Fill Theano's compile cache with the C code seed-era Keras scripts need.

Run by provision.sh in the theano environment, with THEANO_FLAGS pointing
base_compiledir at PREFIX/theano-cache. Each instance starts from a copy of that
folder (the agent's `backend --compile-cache`), so a run's first `fit` does not spend
half a minute compiling, and the shared image is never written to.
"""

import numpy as np
from keras.layers import Activation, Dense, Dropout
from keras.models import Sequential

rng = np.random.RandomState(0)
x = rng.rand(64, 8).astype("float32")
binary = (x.sum(axis=1) > 4).astype("float32")
classes = np.eye(3, dtype="float32")[rng.randint(0, 3, size=64)]

for optimizer in ("sgd", "adam", "rmsprop"):
    for activation in ("relu", "tanh", "sigmoid"):
        model = Sequential()
        model.add(Dense(16, input_dim=8, activation=activation))
        model.add(Dropout(0.2))
        model.add(Dense(1, activation="sigmoid"))
        model.compile(loss="binary_crossentropy", optimizer=optimizer, metrics=["accuracy"])
        model.fit(x, binary, epochs=1, batch_size=16, verbose=0)
        model.evaluate(x, binary, verbose=0)
        model.predict(x)
    model = Sequential([Dense(16, input_dim=8), Activation("relu"), Dense(3, activation="softmax")])
    model.compile(loss="categorical_crossentropy", optimizer=optimizer, metrics=["accuracy"])
    model.fit(x, classes, epochs=1, batch_size=16, verbose=0)
    model.evaluate(x, classes, verbose=0)
    model.predict(x)
    model = Sequential([Dense(16, input_dim=8, activation="relu"), Dense(1)])
    model.compile(loss="mse", optimizer=optimizer)
    model.fit(x, binary, epochs=1, batch_size=16, verbose=0)
print("theano compile cache warmed")
