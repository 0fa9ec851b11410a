#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Testing

@testable import MailTierS3

/// One case of AWS's SigV4 test suite (`aws-sig-v4-test-suite`, the `.req`, `.creq`, `.sts` and
/// `.authz` files): the request as decoded parts, and the three published outputs, verbatim.
struct SuiteVector: Sendable, CustomTestStringConvertible {
    var name: String
    var method: String
    var path: String
    var query: [(name: String, value: String)] = []
    var headers: [(name: String, value: String)]
    var body: String = ""
    var creq: String
    var sts: String
    var authz: String

    var testDescription: String { name }
}

private let suiteDate = Date(timeIntervalSince1970: 1_440_938_160)  // 20150830T123600Z
private let suiteSigner = SigV4Signer(
    accessKey: "AKIDEXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", region: "us-east-1", service: "service")
private let host = ("Host", "example.amazonaws.com")
private let amzDate = ("X-Amz-Date", "20150830T123600Z")
private let sessionToken =
    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="
private let unreserved = "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
private let scope = "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"

let suiteVectors: [SuiteVector] = [
    SuiteVector(
        name: "get-vanilla", method: "GET", path: "/", headers: [host, amzDate],
        creq: """
            GET
            /

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    ),
    SuiteVector(
        name: "get-vanilla-query", method: "GET", path: "/", headers: [host, amzDate],
        creq: """
            GET
            /

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    ),
    SuiteVector(
        name: "get-vanilla-query-order-key-case", method: "GET", path: "/",
        query: [("Param2", "value2"), ("Param1", "value1")], headers: [host, amzDate],
        creq: """
            GET
            /
            Param1=value1&Param2=value2
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
    ),
    SuiteVector(
        name: "get-vanilla-query-order-key", method: "GET", path: "/",
        query: [("Param1", "value2"), ("Param1", "Value1")], headers: [host, amzDate],
        creq: """
            GET
            /
            Param1=Value1&Param1=value2
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            704b4cef673542d84cdff252633f065e8daeba5f168b77116f8b1bcaf3d38f89
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1"
    ),
    SuiteVector(
        name: "get-vanilla-query-order-value", method: "GET", path: "/",
        query: [("Param1", "value2"), ("Param1", "value1")], headers: [host, amzDate],
        creq: """
            GET
            /
            Param1=value1&Param1=value2
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            c968629d70850097a2d8781c9bf7edcb988b04cac14cca9be4acc3595f884606
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694"
    ),
    SuiteVector(
        name: "get-vanilla-query-unreserved", method: "GET", path: "/",
        query: [(unreserved, unreserved)], headers: [host, amzDate],
        creq: """
            GET
            /
            -._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            c30d4703d9f799439be92736156d47ccfb2d879ddf56f5befa6d1d6aab979177
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197"
    ),
    SuiteVector(
        name: "get-vanilla-utf8-query", method: "GET", path: "/",
        query: [("\u{1234}", "bar")], headers: [host, amzDate],
        creq: """
            GET
            /
            %E1%88%B4=bar
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            eb30c5bed55734080471a834cc727ae56beb50e5f39d1bff6d0d38cb192a7073
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"
    ),
    SuiteVector(
        name: "get-vanilla-empty-query-key", method: "GET", path: "/",
        query: [("Param1", "value1")], headers: [host, amzDate],
        creq: """
            GET
            /
            Param1=value1
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            1e24db194ed7d0eec2de28d7369675a243488e08526e8c1c73571282f7c517ab
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb"
    ),
    SuiteVector(
        name: "get-header-key-duplicate", method: "GET", path: "/",
        headers: [host, ("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1"), amzDate],
        creq: """
            GET
            /

            host:example.amazonaws.com
            my-header1:value2,value2,value1
            x-amz-date:20150830T123600Z

            host;my-header1;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            dc7f04a3abfde8d472b0ab1a418b741b7c67174dad1551b4117b15527fbe966c
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;my-header1;x-amz-date, Signature=c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"
    ),
    SuiteVector(
        name: "get-header-value-order", method: "GET", path: "/",
        headers: [
            host, ("My-Header1", "value4"), ("My-Header1", "value1"), ("My-Header1", "value3"), ("My-Header1", "value2"), amzDate,
        ],
        creq: """
            GET
            /

            host:example.amazonaws.com
            my-header1:value4,value1,value3,value2
            x-amz-date:20150830T123600Z

            host;my-header1;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            31ce73cd3f3d9f66977ad3dd957dc47af14df92fcd8509f59b349e9137c58b86
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;my-header1;x-amz-date, Signature=08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01"
    ),
    SuiteVector(
        name: "get-header-value-trim", method: "GET", path: "/",
        headers: [host, ("My-Header1", " value1"), ("My-Header2", " \"a   b   c\""), amzDate],
        creq: """
            GET
            /

            host:example.amazonaws.com
            my-header1:value1
            my-header2:"a b c"
            x-amz-date:20150830T123600Z

            host;my-header1;my-header2;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;my-header1;my-header2;x-amz-date, Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"
    ),
    SuiteVector(
        name: "get-unreserved", method: "GET", path: "/" + unreserved, headers: [host, amzDate],
        creq: """
            GET
            /-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            6a968768eefaa713e2a6b16b589a8ea192661f098f37349f4e2c0082757446f9
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"
    ),
    SuiteVector(
        name: "get-utf8", method: "GET", path: "/\u{1234}", headers: [host, amzDate],
        creq: """
            GET
            /%E1%88%B4

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            2a0a97d02205e45ce2e994789806b19270cfbbb0921b278ccf58f5249ac42102
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"
    ),
    SuiteVector(
        name: "get-space", method: "GET", path: "/example space/", headers: [host, amzDate],
        creq: """
            GET
            /example%20space/

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            63ee75631ed7234ae61b5f736dfc7754cdccfedbff4b5128a915706ee9390d86
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741"
    ),
    SuiteVector(
        name: "post-vanilla", method: "POST", path: "/", headers: [host, amzDate],
        creq: """
            POST
            /

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
    ),
    SuiteVector(
        name: "post-vanilla-query", method: "POST", path: "/", query: [("Param1", "value1")], headers: [host, amzDate],
        creq: """
            POST
            /
            Param1=value1
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            host;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date, Signature=28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11"
    ),
    SuiteVector(
        name: "post-header-key-sort", method: "POST", path: "/", headers: [host, ("My-Header1", "value1"), amzDate],
        creq: """
            POST
            /

            host:example.amazonaws.com
            my-header1:value1
            x-amz-date:20150830T123600Z

            host;my-header1;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            9368318c2967cf6de74404b30c65a91e8f6253e0a8659d6d5319f1a812f87d65
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;my-header1;x-amz-date, Signature=c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"
    ),
    SuiteVector(
        name: "post-header-value-case", method: "POST", path: "/", headers: [host, ("My-Header1", "VALUE1"), amzDate],
        creq: """
            POST
            /

            host:example.amazonaws.com
            my-header1:VALUE1
            x-amz-date:20150830T123600Z

            host;my-header1;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            d51ced243e649e3de6ef63afbbdcbca03131a21a7103a1583706a64618606a93
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;my-header1;x-amz-date, Signature=cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"
    ),
    SuiteVector(
        name: "post-x-www-form-urlencoded", method: "POST", path: "/",
        headers: [("Content-Type", "application/x-www-form-urlencoded"), host, amzDate], body: "Param1=value1",
        creq: """
            POST
            /

            content-type:application/x-www-form-urlencoded
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            content-type;host;x-amz-date
            9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
    ),
    SuiteVector(
        name: "post-x-www-form-urlencoded-parameters", method: "POST", path: "/",
        headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf8"), host, amzDate], body: "Param1=value1",
        creq: """
            POST
            /

            content-type:application/x-www-form-urlencoded; charset=utf8
            host:example.amazonaws.com
            x-amz-date:20150830T123600Z

            content-type;host;x-amz-date
            9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            2e1cf7ed91881a30569e46552437e4156c823447bf1781b921b5d486c568dd1c
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=content-type;host;x-amz-date, Signature=1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe"
    ),
    SuiteVector(
        name: "post-sts-header-before", method: "POST", path: "/",
        headers: [host, amzDate, ("X-Amz-Security-Token", sessionToken)],
        creq: """
            POST
            /

            host:example.amazonaws.com
            x-amz-date:20150830T123600Z
            x-amz-security-token:\(sessionToken)

            host;x-amz-date;x-amz-security-token
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """,
        sts: """
            AWS4-HMAC-SHA256
            20150830T123600Z
            20150830/us-east-1/service/aws4_request
            c237e1b440d4c63c32ca95b5b99481081cb7b13c7e40434868e71567c1a882f6
            """,
        authz: "AWS4-HMAC-SHA256 Credential=\(scope), SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
    ),
]

@Suite("SigV4 signing")
struct SigV4Tests {
    @Test("AWS SigV4 test suite", arguments: suiteVectors)
    func awsTestSuite(_ vector: SuiteVector) {
        let signature = suiteSigner.sign(
            method: vector.method, path: vector.path, query: vector.query, headers: vector.headers,
            payloadHash: SigV4.hexSHA256(vector.body), date: suiteDate)
        #expect(signature.canonicalRequest == vector.creq)
        #expect(signature.stringToSign == vector.sts)
        #expect(signature.authorization == vector.authz)
    }

    @Test func theSuiteHasEnoughVectors() {
        #expect(suiteVectors.count >= 8)
        #expect(Set(suiteVectors.map(\.name)).count == suiteVectors.count)
    }

    // MARK: S3 documentation examples (sig-v4-header-based-auth), bucket examplebucket, 20130524

    private static let s3Signer = SigV4Signer(
        accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1", service: "s3")
    private static let s3Date = Date(timeIntervalSince1970: 1_369_353_600)  // 20130524T000000Z
    private static let s3Host = ("host", "examplebucket.s3.amazonaws.com")

    @Test("S3 docs: GET object with Range")
    func s3GetObjectWithRange() {
        let signature = Self.s3Signer.sign(
            method: "GET", path: "/test.txt",
            headers: [
                Self.s3Host, ("range", "bytes=0-9"), ("x-amz-content-sha256", SigV4.emptyPayloadHash),
                ("x-amz-date", "20130524T000000Z"),
            ],
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        #expect(
            signature.canonicalRequest == """
                GET
                /test.txt

                host:examplebucket.s3.amazonaws.com
                range:bytes=0-9
                x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
                x-amz-date:20130524T000000Z

                host;range;x-amz-content-sha256;x-amz-date
                e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
                """)
        #expect(
            signature.stringToSign == """
                AWS4-HMAC-SHA256
                20130524T000000Z
                20130524/us-east-1/s3/aws4_request
                7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972
                """)
        #expect(signature.signature == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
        #expect(
            signature.authorization
                == "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        )
    }

    @Test("S3 docs: PUT object (key with $, body hash)")
    func s3PutObject() {
        let payloadHash = SigV4.hexSHA256("Welcome to Amazon S3.")
        #expect(payloadHash == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")
        let signature = Self.s3Signer.sign(
            method: "PUT", path: "/test$file.text",
            headers: [
                Self.s3Host, ("Date", "Fri, 24 May 2013 00:00:00 GMT"), ("x-amz-date", "20130524T000000Z"),
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"), ("x-amz-content-sha256", payloadHash),
            ],
            payloadHash: payloadHash, date: Self.s3Date)
        #expect(
            signature.canonicalRequest == """
                PUT
                /test%24file.text

                date:Fri, 24 May 2013 00:00:00 GMT
                host:examplebucket.s3.amazonaws.com
                x-amz-content-sha256:44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072
                x-amz-date:20130524T000000Z
                x-amz-storage-class:REDUCED_REDUNDANCY

                date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class
                44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072
                """)
        #expect(
            signature.stringToSign == """
                AWS4-HMAC-SHA256
                20130524T000000Z
                20130524/us-east-1/s3/aws4_request
                9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d
                """)
        #expect(signature.signature == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
    }

    @Test("S3 docs: GET bucket lifecycle (valueless sub-resource) and list objects (sorted query)")
    func s3QueryExamples() {
        let headers = [Self.s3Host, ("x-amz-content-sha256", SigV4.emptyPayloadHash), ("x-amz-date", "20130524T000000Z")]
        let lifecycle = Self.s3Signer.sign(
            method: "GET", path: "/", query: [("lifecycle", "")], headers: headers, payloadHash: SigV4.emptyPayloadHash,
            date: Self.s3Date)
        #expect(lifecycle.canonicalRequest.split(separator: "\n", omittingEmptySubsequences: false)[2] == "lifecycle=")
        #expect(lifecycle.signature == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")
        let list = Self.s3Signer.sign(
            method: "GET", path: "/", query: [("prefix", "J"), ("max-keys", "2")], headers: headers,
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        #expect(list.canonicalRequest.split(separator: "\n", omittingEmptySubsequences: false)[2] == "max-keys=2&prefix=J")
        #expect(list.signature == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    }

    @Test func authorizeAddsTheDateAndTheAuthorizationHeader() {
        let headers = Self.s3Signer.authorize(
            method: "GET", path: "/test.txt",
            headers: [Self.s3Host, ("range", "bytes=0-9"), ("x-amz-content-sha256", SigV4.emptyPayloadHash)],
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        #expect(headers.contains { $0.name == "x-amz-date" && $0.value == "20130524T000000Z" })
        #expect(headers.last?.name == "Authorization")
        #expect(headers.last?.value.hasSuffix("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41") == true)
    }

    @Test func aChangedRequestChangesTheSignature() {
        let base = Self.s3Signer.sign(
            method: "GET", path: "/a", headers: [Self.s3Host, ("x-amz-date", "20130524T000000Z")],
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        let otherKey = Self.s3Signer.sign(
            method: "GET", path: "/b", headers: [Self.s3Host, ("x-amz-date", "20130524T000000Z")],
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        let otherSecret = SigV4Signer(accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "other", region: "us-east-1").sign(
            method: "GET", path: "/a", headers: [Self.s3Host, ("x-amz-date", "20130524T000000Z")],
            payloadHash: SigV4.emptyPayloadHash, date: Self.s3Date)
        #expect(base.signature != otherKey.signature)
        #expect(base.signature != otherSecret.signature)
        #expect(base.signature.count == 64)
    }

    // MARK: Encoding rules

    @Test func uriEncodingRules() {
        #expect(SigV4.uriEncode("a b") == "a%20b")
        #expect(SigV4.uriEncode("a+b") == "a%2Bb")
        #expect(SigV4.uriEncode("~-._AZaz09") == "~-._AZaz09")
        #expect(SigV4.uriEncode("100%") == "100%25")
        #expect(SigV4.uriEncode("=&?#!'()*$,;:@") == "%3D%26%3F%23%21%27%28%29%2A%24%2C%3B%3A%40")
        #expect(SigV4.uriEncode("a/b") == "a%2Fb")
        #expect(SigV4.uriEncode("a/b", encodeSlash: false) == "a/b")
        #expect(SigV4.uriEncode("é") == "%C3%A9")
        #expect(SigV4.uriEncode("ключ") == "%D0%BA%D0%BB%D1%8E%D1%87")
        #expect(SigV4.uriEncode("😀") == "%F0%9F%98%80")
    }

    @Test func canonicalURIKeepsSlashesOfS3Keys() {
        #expect(SigV4.canonicalURI(path: "") == "/")
        #expect(SigV4.canonicalURI(path: "/bucket/spool/a b+c~d.eml") == "/bucket/spool/a%20b%2Bc~d.eml")
        #expect(SigV4.canonicalURI(path: "/bucket/2024/03/07/msg_1.eml") == "/bucket/2024/03/07/msg_1.eml")
        // S3 does not normalize: dot segments and double slashes are kept.
        #expect(SigV4.canonicalURI(path: "/bucket/a//b/./c/../d") == "/bucket/a//b/./c/../d")
        #expect(SigV4.canonicalURI(path: "/bucket/dossier/été.txt") == "/bucket/dossier/%C3%A9t%C3%A9.txt")
    }

    @Test func canonicalQueryEncodesAndSorts() {
        #expect(SigV4.canonicalQueryString([]) == "")
        #expect(
            SigV4.canonicalQueryString([("prefix", "spool/a b"), ("list-type", "2"), ("continuation-token", "x+y=")])
                == "continuation-token=x%2By%3D&list-type=2&prefix=spool%2Fa%20b")
        // Sorted by byte value: upper case before lower case.
        #expect(SigV4.canonicalQueryString([("b", "1"), ("a", "1"), ("A", "1")]) == "A=1&a=1&b=1")
    }

    @Test func headerValuesAreTrimmedAndCollapsed() {
        #expect(SigV4.canonicalHeaderValue("  a \t b   c  ") == "a b c")
        #expect(SigV4.canonicalHeaderValue("") == "")
        let (block, signed) = SigV4.canonicalHeaders([("X-B", "2"), ("x-a", " 1 "), ("X-A", "3")])
        #expect(block == "x-a:1,3\nx-b:2\n")
        #expect(signed == "x-a;x-b")
    }

    @Test func signingKeyDerivation() {
        // The signing key of AWS's general reference example (iam, 20150830).
        let key = SigV4.signingKey(
            secretKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", dateStamp: "20150830", region: "us-east-1", service: "iam")
        #expect(SigV4.hex(key) == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9")
    }

    @Test func dates() {
        #expect(SigV4.amzDate(Date(timeIntervalSince1970: 0)) == "19700101T000000Z")
        #expect(SigV4.amzDate(suiteDate) == "20150830T123600Z")
        #expect(SigV4.amzDate(Date(timeIntervalSince1970: 951_782_400)) == "20000229T000000Z")
        #expect(SigV4.amzDate(Date(timeIntervalSince1970: 4_102_444_799.9)) == "20991231T235959Z")
        #expect(SigV4.dateStamp(suiteDate) == "20150830")
    }

    @Test func theSignerNeverShowsItsSecret() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        let signer = SigV4Signer(accessKey: "AKID", secretKey: secret, region: "us-east-1")
        var dumped = ""
        dump(signer, to: &dumped)
        #expect(!String(describing: signer).contains(secret))
        #expect(!String(reflecting: signer).contains(secret))
        #expect(!dumped.contains(secret))
    }
}
